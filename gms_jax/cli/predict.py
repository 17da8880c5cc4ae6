"""``gms-jax predict``: parse, then :func:`gms_jax.predict.predict_files`."""

from __future__ import annotations

import os
import sys

from gms_jax import errors, outputs
from gms_jax.predict import (
  FUSION_HELP,
  TTA_CHOICES,
  TTA_HELP,
  Segmenter,
  check_workdir,
  collect_images,
  output_names,
  parse_checkpoint,
  parse_fusion,
  predict_files,
)


def parse(argv: list[str] | None = None):
  """The parsed arguments (nothing is read or written); bad ones raise."""
  parser = errors.ArgumentParser(
    prog="gms-jax predict", description="Segment image files or folders with a trained workdir."
  )
  parser.add_argument(
    "--workdir", required=True, help="training workdir (holds config.json and checkpoints)"
  )
  parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
  parser.add_argument(
    "--out",
    required=True,
    help="output folder for the masks (0/255 PNG, native size), keeping the inputs' "
    "relative paths; a new or empty folder, or an earlier predict output",
  )
  parser.add_argument(
    "--checkpoint", default="best", help="'best' (validation Dice), 'latest' or a step"
  )
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--tta", default="none", choices=TTA_CHOICES, help=TTA_HELP)
  parser.add_argument("--cpu-library-fusion", default=None, help=FUSION_HELP)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse(argv)
  if args.batch_size < 1:
    raise errors.UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
  which = parse_checkpoint(args.checkpoint)
  if args.cpu_library_fusion is not None:
    parse_fusion(args.cpu_library_fusion)  # refuse before any work
  out = os.path.abspath(args.out)
  not_images: list[str] = []
  files = collect_images(args.inputs, not_images)
  if not files:
    raise errors.UsageError("no image files found in " + " ".join(args.inputs))
  outputs.check_disjoint(out, args.inputs)
  outputs.check_owned(out, "predict")
  check_workdir(args.workdir)
  names = output_names(files)
  seg = Segmenter.from_workdir(
    args.workdir,
    which,
    batch_size=args.batch_size,
    tta=args.tta,
    cpu_library_fusion=args.cpu_library_fusion,
  )

  written, skipped = predict_files(seg, files, names, out)
  print(f"wrote {written} masks to {out} (checkpoint step {seg.step})")
  for path in not_images:
    print(
      f"gms-jax predict: not read: {path} (not an image format Pillow reads, or hidden)",
      file=sys.stderr,
    )
  for path, reason in skipped:
    print(f"gms-jax predict: skipped {path}: {reason}", file=sys.stderr)
  if skipped:
    raise errors.GmsError(f"{len(skipped)} of {len(files)} images skipped (listed above)")
  return 0
