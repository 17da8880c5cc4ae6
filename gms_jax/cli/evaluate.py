"""``gms-jax evaluate``: parse, then :func:`gms_jax.evaluate.evaluate`."""

from __future__ import annotations

import os

from gms_jax import errors, outputs
from gms_jax import evaluate as evaluate_lib
from gms_jax.data.checks import DataError
from gms_jax.evaluate import data_config, evaluate
from gms_jax.predict import (
  FUSION_HELP,
  TTA_CHOICES,
  TTA_HELP,
  Segmenter,
  check_workdir,
  parse_checkpoint,
  parse_fusion,
)

SPLIT_ALIASES = {"val": "validation", "valid": "validation"}


def parse(argv: list[str] | None = None):
  """The parsed arguments (nothing is read or written); bad ones raise."""
  parser = errors.ArgumentParser(
    prog="gms-jax evaluate", description=evaluate_lib.__doc__.split("\n")[0]
  )
  parser.add_argument("--workdir", required=True)
  parser.add_argument(
    "--dataset",
    default=None,
    help="dataset name (default: the one trained on); another name = cross-domain",
  )
  parser.add_argument(
    "--root", default=None, help="dataset folder (GMS layout), if not the config's"
  )
  parser.add_argument(
    "--split-file", default=None, help="split file for --dataset (GMS .pkl or .json)"
  )
  parser.add_argument(
    "--split", default="test", choices=["test", "validation", "val", "valid", "train", "all"]
  )
  parser.add_argument(
    "--checkpoint", default="best", help="'best' (validation Dice), 'latest' or a step"
  )
  parser.add_argument(
    "--out",
    default=None,
    help="a new or empty folder, or an earlier evaluate output to replace "
    "(default: <workdir>/eval/<dataset>-<split>, + '-tta-<views>' with --tta)",
  )
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--max-overlays", type=int, default=64)
  parser.add_argument(
    "--montage",
    type=int,
    default=8,
    help="overlays of the first N images in one grid, overlays_montage.png (0: none)",
  )
  parser.add_argument("--tta", default="none", choices=TTA_CHOICES, help=TTA_HELP)
  parser.add_argument("--cpu-library-fusion", default=None, help=FUSION_HELP)
  parser.add_argument(
    "--tfds-dir",
    default=None,
    help="where the prepared dataset (TFDS ArrayRecord cache) is written and read (default: the "
    "training config's data.tfds_dir; '' there = ~/tensorflow_datasets)",
  )
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse(argv)
  args.split = SPLIT_ALIASES.get(args.split, args.split)
  if args.batch_size < 1:
    raise errors.UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
  for flag, v in (("--max-overlays", args.max_overlays), ("--montage", args.montage)):
    if v < 0:
      raise errors.UsageError(f"{flag} must be >= 0, got {v}")
  which = parse_checkpoint(args.checkpoint)
  if args.cpu_library_fusion is not None:
    parse_fusion(args.cpu_library_fusion)  # refuse before any work

  from gms_jax import checkpoint
  from gms_jax.data import builder, pipeline

  check_workdir(args.workdir)
  data = data_config(checkpoint.load_config(args.workdir), args.dataset, args.root, args.split_file)
  if args.tfds_dir is not None:
    data.tfds_dir = args.tfds_dir
  suffix = "" if args.tta == "none" else f"-tta-{args.tta}"  # never replaces the METHOD §4 output
  out = args.out or os.path.join(args.workdir, "eval", f"{data.name}-{args.split}{suffix}")
  outputs.check_owned(os.path.abspath(out), "evaluate")  # refuse before any work
  seg = Segmenter.from_workdir(
    args.workdir,
    which,
    batch_size=args.batch_size,
    tta=args.tta,
    cpu_library_fusion=args.cpu_library_fusion,
  )
  with data.unlocked():
    data.num_classes = 0  # read from the data, then compared with the model's below
  try:
    sources = builder.prepare(data)
  except (FileNotFoundError, ValueError) as e:
    raise errors.ConfigError(errors.one_line(e)) if not isinstance(e, DataError) else e
  n_data = sources["test"].num_classes
  if n_data != seg.classes.num_classes:
    raise errors.ConfigError(
      f"{data.root or data.name}: the data has {n_data} classes (dataset.json labels) but the "
      f"model in {args.workdir} predicts {seg.classes.num_classes}"
    )
  data_names = tuple(sources["test"].class_names)
  if seg.classes.names and data_names and tuple(seg.classes.names) != data_names:
    raise errors.ConfigError(
      f"{data.root or data.name}: dataset.json labels {list(data_names)} (by id) differ from the "
      f"model's {list(seg.classes.names)} in {args.workdir}"
    )
  if not seg.classes.binary and not seg.classes.names:  # e.g. an imported mapper: the data's
    import dataclasses

    seg.classes = dataclasses.replace(seg.classes, names=sources["test"].class_names)
  splits = ["train", "validation", "test"] if args.split == "all" else [args.split]

  def examples():
    for s in splits:
      yield from pipeline.eval_examples(sources[s], image_size=seg.image_size)

  summary = evaluate(
    seg,
    examples(),
    out,
    max_overlays=args.max_overlays,
    montage_n=args.montage,
    meta={
      "dataset": data.name,
      "root": str(data.root),
      "split": args.split,
      "workdir": os.path.abspath(args.workdir),
      "tta": args.tta,
      "cpu_library_fusion": seg.cpu_library_fusion,
    },
  )
  keys = ["dsc", "iou", "hd95", "dsc_native", "iou_native", "hd95_native"]
  if not seg.classes.binary:
    keys = [f"dsc_{n}" for n in seg.classes.class_names()[1:]] + keys[:3] + ["dsc_fg"]
  print(
    f"{data.name}/{args.split}{suffix}: n={summary['n']} step={summary['checkpoint_step']}  "
    + "  ".join(
      f"{k}={summary[k]['mean']:.4f}±{summary[k]['std']:.4f}"
      if summary[k]["mean"] is not None
      else f"{k}=absent"
      for k in keys
    )
    + (
      f"  lesion-type accuracy={summary['lesion_type']['accuracy']:.4f} "
      f"(n={summary['lesion_type']['n']})"
      if "lesion_type" in summary
      else ""
    )
  )
  print(f"wrote {out}/metrics.csv, summary.json, masks/, overlays/")
  return 0
