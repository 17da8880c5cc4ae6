"""``gms-jax export``: parse, then :func:`gms_jax.pretrained.export_mapper`."""

from __future__ import annotations

from gms_jax import errors
from gms_jax.pretrained import EXPORT_FORMATS, export_mapper


def parse(argv: list[str] | None = None):
  """The parsed arguments (nothing is read or written); bad ones raise."""
  parser = errors.ArgumentParser(
    prog="gms-jax export",
    description="Write a workdir's latent mapper as an official GMS checkpoint ({'model': state_dict}, "
    "loadable by the original ResAttnUNet_DS with strict=True).",
  )
  parser.add_argument("--workdir", required=True)
  parser.add_argument(
    "--checkpoint", default="best", help="'best' (validation Dice), 'latest' or a step"
  )
  parser.add_argument(
    "--format",
    default="pth",
    choices=EXPORT_FORMATS,
    help="pth: torch pickle (needs torch); safetensors: same state dict, torch-free",
  )
  parser.add_argument("out", help="output file (never overwritten)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse(argv)
  which = int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint
  if which not in ("best", "latest") and not isinstance(which, int):
    raise errors.UsageError(
      f"--checkpoint must be 'best', 'latest' or a step number, got {which!r}"
    )
  info = export_mapper(args.workdir, args.out, which=which, fmt=args.format)
  print(
    f"wrote {info['out']}: step {info['step']}, {info['keys']} keys, {info['params']:,} parameters "
    f"({args.format})"
  )
  return 0
