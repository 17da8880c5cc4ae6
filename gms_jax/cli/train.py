"""``gms-jax train``: parse (absl flags, ``--config NAME``), then :func:`gms_jax.train.train_and_evaluate`."""

from __future__ import annotations

import os
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from gms_jax import configuration, errors, parallel
from gms_jax.train import check_workdir, quiet_library_logs, train_and_evaluate

FLAGS = flags.FLAGS


_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Training config file, e.g. configs/gms.py:busi", lock_config=True
)


_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.json")


_USAGE = "--config NAME --workdir DIR [--config.key=value ...]"


def main(argv: list[str] | None = None) -> int:
  """absl entry point: ``argv[0]`` is the program name, the rest are flags. Errors are raised
  (as :class:`gms_jax.errors.GmsError` where they are the user's to fix); ``gms_jax.cli`` prints
  them as one line."""
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "--help", "-help") for a in argv[1:]):
    print(
      f"usage: {argv[0]} {_USAGE}\n\n"
      "NAME: a dataset (sample, busi, bus-bra, ph2, drive, chase_db1, folder) with optional\n"
      "modifiers, e.g. smoke | busi,taef2 | ph2,bf16 (see configs/gms.py). Training resumes\n"
      "from the latest checkpoint in DIR when DIR holds a run of the same config (a different\n"
      "model, data or schedule is refused); DIR/metrics.jsonl, DIR/tensorboard, DIR/config.json."
    )
    return 0
  argv = configuration.resolve_config_argv(argv)
  try:
    extra = FLAGS(argv)
  except Exception as e:  # absl/ml_collections raise many types
    raise configuration.flag_error(argv, e, f"usage: gms-jax train {_USAGE}") from None
  if len(extra) > 1:
    raise errors.UsageError(f"unexpected arguments {extra[1:]}; usage: {_USAGE}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise errors.UsageError(f"--config and --workdir are required; usage: {_USAGE}")
  config = _CONFIG.value
  configuration.validate(config)  # before any logging or work (again with devices in training)
  check_workdir(config, os.path.abspath(_WORKDIR.value))
  logging.use_absl_handler()
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
  quiet_library_logs()
  parallel.initialize_distributed(config.distributed)
  logging.info(
    "JAX process %d/%d, local devices %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  train_and_evaluate(config, _WORKDIR.value)
  return 0
