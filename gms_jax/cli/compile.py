"""``gms-jax compile``: parse, then :func:`gms_jax.aot.compile_for` and :func:`gms_jax.aot.format_table`."""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from gms_jax import aot, configuration, errors, outputs
from gms_jax.aot import TARGETS, compile_for, format_table

_FLAGS = flags.FlagValues()


_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Training config file, e.g. configs/gms.py:busi",
  flag_values=_FLAGS,
  lock_config=True,
)


_TARGET = flags.DEFINE_string("target", None, "One of: " + ", ".join(TARGETS), flag_values=_FLAGS)


_SLICES = flags.DEFINE_integer(
  "num_slices", 1, "TPU slices (multi-slice data parallel)", flag_values=_FLAGS
)


_INF_BATCH = flags.DEFINE_integer(
  "inference_batch", 64, "Inference images per device", flag_values=_FLAGS
)


_JSON = flags.DEFINE_string("json", "", "Write the record as JSON here", flag_values=_FLAGS)


_TRAIN_EXAMPLES = flags.DEFINE_integer(
  "train_examples",
  0,
  "Training examples of the dataset (> 0: steps per epoch and the whole "
  "schedule's cost, estimated; e.g. 517 for BUSI's GMS split less validation)",
  flag_values=_FLAGS,
)


USAGE = (
  "usage: gms-jax compile --config NAME --target TARGET [--num-slices N] "
  "[--inference-batch 64] [--train-examples N] [--json OUT] [--config.key=value ...]"
)


def main(argv: list[str] | None = None) -> int:
  """Errors are raised (:class:`gms_jax.errors.GmsError` where they are the user's to fix);
  ``gms_jax.cli`` prints them as one line (exit 2: usage/config, 1: e.g. compiler missing)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help", "-help") for a in argv):
    print(f"{USAGE}\n\nTARGET: {', '.join(TARGETS)}\n\n{aot.__doc__.split(chr(10) * 2, 2)[2]}")
    return 0
  argv = [
    a.replace("--num-slices", "--num_slices")
    .replace("--inference-batch", "--inference_batch")
    .replace("--train-examples", "--train_examples")
    for a in argv
  ]
  argv = configuration.resolve_config_argv(argv)
  try:
    extra = _FLAGS(["gms-jax compile"] + argv)
  except Exception as e:  # absl/ml_collections raise many types
    raise configuration.flag_error(argv, e, USAGE) from None
  if len(extra) > 1:
    raise errors.UsageError(f"unexpected arguments {extra[1:]}; {USAGE}")
  if _CONFIG.value is None or not _TARGET.value:
    raise errors.UsageError(f"--config and --target are required; {USAGE}")
  if _TARGET.value not in TARGETS:
    raise errors.UsageError(f"unknown target {_TARGET.value!r}; one of {', '.join(TARGETS)}")
  config = _CONFIG.value
  configuration.validate(config, check_tokenizer=False)  # weights are not needed to compile
  if _JSON.value:
    _check_json_out(_JSON.value)
  rec = compile_for(
    config,
    _TARGET.value,
    num_slices=_SLICES.value,
    inference_batch=_INF_BATCH.value,
    train_examples=_TRAIN_EXAMPLES.value,
    log=lambda m: print(m, file=sys.stderr, flush=True),
  )
  print(format_table(rec))
  if _JSON.value:
    outputs.write_json_atomic(os.path.abspath(_JSON.value), {WRITTEN_BY: True, **rec}, indent=1)
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
