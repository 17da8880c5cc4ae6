"""``gms-jax convert``: parse, then :func:`gms_jax.convert.convert` and ``save_params``."""

from __future__ import annotations

import argparse
import os
import time

from gms_jax.convert import FORMATS, convert
from gms_jax.convert.core import save_params


def parse(argv: list[str] | None = None):
  """The parsed arguments (nothing is read or written); bad ones raise."""
  parser = argparse.ArgumentParser(
    prog="gms-jax convert",
    description="Convert PyTorch weights to a Flax safetensors parameter file (strict: any missing, "
    "unexpected or mis-shaped key is an error).",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="formats:\n" + "\n".join(f"  {k:11s} {v}" for k, v in FORMATS.items()),
  )
  parser.add_argument("--format", required=True, choices=sorted(FORMATS))
  parser.add_argument("src", help="source checkpoint file or directory")
  parser.add_argument("out", help="output .safetensors file (written atomically)")
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing OUT (by default an existing file is never replaced)",
  )
  parser.add_argument(
    "--scaling-factor",
    type=float,
    default=None,
    help="SD VAE latent scale (default: config.json's, else 0.18215; SD-XL: 0.13025)",
  )
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse(argv)
  if os.path.exists(args.out) and (
    not args.overwrite
    or os.path.isdir(args.out)
    or os.path.realpath(args.out) == os.path.realpath(args.src)
  ):
    from gms_jax.errors import OutputError

    raise OutputError(
      f"{args.out}: exists; refusing to replace it (choose another OUT, or "
      "--overwrite for a file that is not the source)"
    )
  t0 = time.perf_counter()
  flat, family, config = convert(
    args.format,
    args.src,  # errors: one line via gms_jax.cli
    scaling_factor=args.scaling_factor,
  )
  save_params(args.out, flat, family=family, config=config)
  n = sum(int(v.size) for v in flat.values())
  print(
    f"wrote {args.out}: family={family}, {len(flat)} tensors, {n:,} parameters, "
    f"{time.perf_counter() - t0:.1f}s"
  )
  return 0
