"""``gms-jax compile``: parse, then :func:`gms_jax.aot.compile_for` and :func:`gms_jax.aot.format_table`."""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from gms_jax import aot, configuration, errors, outputs
from gms_jax.aot import TARGETS, compile_for, format_table

USAGE = (
  "usage: gms-jax compile --config NAME --target TARGET [--num-slices N] "
  "[--inference-batch 64] [--train-examples N] [--json OUT] [--config.key=value ...]"
)


def parse(argv: list[str] | None = None, *, check_paths: bool = True):
  """The parsed flags (``.config``, ``.target``, ``.num_slices``, ``.inference_batch``,
  ``.train_examples``, ``.json``) or None for --help; the config is loaded and validated."""
  import types

  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help", "-help") for a in argv):
    return None
  argv = [
    a.replace("--num-slices", "--num_slices")
    .replace("--inference-batch", "--inference_batch")
    .replace("--train-examples", "--train_examples")
    for a in argv
  ]
  argv = configuration.resolve_config_argv(argv)
  full = ["gms-jax compile"] + argv
  fv = flags.FlagValues()
  cfg = config_flags.DEFINE_config_file(
    "config",
    None,
    "training config: NAME or configs/gms.py:NAME",
    flag_values=fv,
    lock_config=True,
    sys_argv=full,
  )
  target = flags.DEFINE_string("target", None, "One of: " + ", ".join(TARGETS), flag_values=fv)
  slices = flags.DEFINE_integer(
    "num_slices", 1, "TPU slices (multi-slice data parallel)", flag_values=fv
  )
  inf_batch = flags.DEFINE_integer(
    "inference_batch", 64, "Inference images per device", flag_values=fv
  )
  json_out = flags.DEFINE_string("json", "", "Write the record as JSON here", flag_values=fv)
  train_examples = flags.DEFINE_integer(
    "train_examples",
    0,
    "Training examples of the dataset (> 0: steps per epoch and the whole schedule's cost, "
    "estimated; e.g. 465: BUSI's GMS training split less its validation tenth)",
    flag_values=fv,
  )
  try:
    extra = fv(full)
    config = cfg.value
  except Exception as e:  # absl/ml_collections raise many types
    raise configuration.flag_error(argv, e, USAGE) from None
  if len(extra) > 1:
    raise errors.UsageError(f"unexpected arguments {extra[1:]}; {USAGE}")
  if config is None or not target.value:
    raise errors.UsageError(f"--config and --target are required; {USAGE}")
  if target.value not in TARGETS:
    raise errors.UsageError(f"unknown target {target.value!r}; one of {', '.join(TARGETS)}")
  configuration.validate(
    config, check_tokenizer=False, check_paths=check_paths, check_data=False
  )  # weights are not needed to compile
  return types.SimpleNamespace(
    config=config,
    target=target.value,
    num_slices=slices.value,
    inference_batch=inf_batch.value,
    train_examples=train_examples.value,
    json=json_out.value,
  )


def main(argv: list[str] | None = None) -> int:
  """Errors are raised (:class:`gms_jax.errors.GmsError` where they are the user's to fix);
  ``gms_jax.cli`` prints them as one line (exit 2: usage/config, 1: e.g. compiler missing)."""
  args = parse(argv)
  if args is None:
    print(f"{USAGE}\n\nTARGET: {', '.join(TARGETS)}\n\n{aot.__doc__.split(chr(10) * 2, 2)[2]}")
    return 0
  if args.json:
    _check_json_out(args.json)
  rec = compile_for(
    args.config,
    args.target,
    num_slices=args.num_slices,
    inference_batch=args.inference_batch,
    train_examples=args.train_examples,
    log=lambda m: print(m, file=sys.stderr, flush=True),
  )
  print(format_table(rec))
  if args.json:
    outputs.write_json_atomic(os.path.abspath(args.json), {WRITTEN_BY: True, **rec}, indent=1)
  return 0


WRITTEN_BY = "gms_jax_compile_record"


def _check_json_out(path: str) -> None:
  """``--json OUT`` replaces only an earlier ``gms-jax compile`` record, never another file."""
  if os.path.isdir(path):
    raise errors.OutputError(f"--json {path}: is a folder")
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      ours = json.load(f).get(WRITTEN_BY) is True
  except (OSError, ValueError, AttributeError):
    ours = False
  if not ours:
    raise errors.OutputError(
      f"--json {path}: exists and is not a gms-jax compile record; refusing to replace it"
    )
