"""``gms-jax check-data``: parse, then :func:`gms_jax.data.checks.check_folder`."""

from __future__ import annotations

import argparse
import sys

from gms_jax.data.checks import check_folder
from gms_jax.errors import DataError


def parse(argv: list[str] | None = None):
  """The parsed arguments (nothing is read or written); bad ones raise."""
  p = argparse.ArgumentParser(
    prog="gms-jax check-data",
    description="Check a dataset folder (images/, masks/, optional split file) and report "
    "every problem at once.",
  )
  p.add_argument("path", help="dataset folder with images/ and masks/")
  p.add_argument(
    "--split-file",
    default="",
    help="GMS pickle or JSON split (default: the "
    "folder's split.json or *_train_test_names.pkl, else a ratio split)",
  )
  p.add_argument(
    "--dataset",
    default="folder",
    help="shipped dataset name, for its default split rule (default: folder)",
  )
  p.add_argument("--test-fraction", type=float, default=0.2)
  p.add_argument("--val-fraction", type=float, default=0.1)
  p.add_argument("--split-seed", type=int, default=2333)
  p.add_argument("--no-decode", action="store_true", help="only check pairing and splits")
  p.add_argument("--quiet", "-q", action="store_true", help="do not print warnings")
  return p.parse_args(list(argv) if argv is not None else None)


def main(argv: list[str] | None = None) -> int:
  """``gms-jax check-data PATH``: report every problem in a GMS-layout folder; 0 when clean."""
  args = parse(argv)
  try:
    scan, desc = check_folder(
      args.path,
      dataset=args.dataset,
      split_file=args.split_file or None,
      test_fraction=args.test_fraction,
      val_fraction=args.val_fraction,
      seed=args.split_seed,
      decode=not args.no_decode,
    )
  except DataError as e:
    print(f"ERROR {e}", file=sys.stderr)
    return 1
  if not args.quiet:
    for w in scan.warnings:
      print(f"warning {w}")
  for problem in scan.problems:
    print(f"ERROR {problem}")
  if scan.class_names is not None:
    print(f"classes (dataset.json): {len(scan.class_names)}")
    if scan.class_cases is not None and not args.no_decode:
      total = max(sum(scan.class_pixels), 1)
      for c, name in enumerate(scan.class_names):
        print(
          f"  {c} {name}: {scan.class_cases[c]} case(s), {scan.class_pixels[c]:,} pixels "
          f"({100.0 * scan.class_pixels[c] / total:.2f} %)"
        )
  print(
    f"{scan.root}: {len(scan.pairs)} image/mask pair(s), {len(scan.problems)} problem(s)"
    + (f"; splits: {desc}" if desc else "")
  )
  return 1 if scan.problems else 0
