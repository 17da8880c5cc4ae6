"""``gms-jax plot``: parse, then :func:`gms_jax.plot.read_curve` and :func:`gms_jax.plot.draw`."""

from __future__ import annotations

from pathlib import Path

from gms_jax import errors, outputs
from gms_jax import plot as plot_lib
from gms_jax.plot import draw, read_curve


def parse(argv: list[str] | None = None):
  """The parsed arguments (nothing is read or written); bad ones raise."""
  parser = errors.ArgumentParser(prog="gms-jax plot", description=plot_lib.__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
  parser.add_argument("--out", required=True, help="PNG file to write (refused if it exists)")
  parser.add_argument(
    "--label",
    action="append",
    default=None,
    help="legend label per WORKDIR, in order (default: the folder names)",
  )
  parser.add_argument(
    "--metric",
    action="append",
    default=None,
    help="metrics.jsonl key to plot (default eval/val_dice); repeat for several, e.g. the "
    "per-class eval/val_dice_<name> of a multi-class run",
  )
  parser.add_argument("--title", default="")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse(argv)
  labels = args.label or [Path(w).resolve().name for w in args.workdirs]
  if len(labels) != len(args.workdirs):
    raise errors.UsageError(f"{len(labels)} --label for {len(args.workdirs)} workdirs")
  out = Path(args.out)
  if out.exists() and not args.overwrite:
    raise errors.OutputError(f"{out} exists; pass --overwrite to replace it")
  metrics = args.metric or ["eval/val_dice"]
  short = lambda m: m.split("/")[-1].replace("_", " ")  # noqa: E731
  curves = [
    (lab if len(metrics) == 1 else f"{lab}: {short(m)}", read_curve(w, m))
    for lab, w in zip(labels, args.workdirs)
    for m in metrics
  ]
  ylabel = (
    "validation Dice"
    if metrics == ["eval/val_dice"] or all(m.startswith("eval/val_dice") for m in metrics)
    else short(metrics[0])
  )
  outputs.write_atomic(
    out, lambda tmp: draw(curves, tmp, ylabel=ylabel, title=args.title), suffix=out.suffix
  )
  for lab, pts in curves:
    best = max(pts, key=lambda p: p[1])
    print(
      f"{lab}: {len(pts)} points, last {pts[-1][1]:.4f} at {pts[-1][0]:.1f} min, "
      f"best {best[1]:.4f} at {best[0]:.1f} min"
    )
  print(f"wrote {out}")
  return 0
