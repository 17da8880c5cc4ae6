"""``gms-jax train``: parse (absl flags, ``--config NAME``), then :func:`gms_jax.train.train_and_evaluate`."""

from __future__ import annotations

import os
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from gms_jax import configuration, errors, parallel
from gms_jax.lock import WorkdirLock
from gms_jax.train import check_workdir, quiet_library_logs, resolve_classes, train_and_evaluate

USAGE = "usage: gms-jax train --config NAME --workdir DIR [--config.key=value ...]"
HELP = (
  "NAME: a dataset (sample, busi, bus-bra, ph2, drive, chase_db1, folder) with optional\n"
  "modifiers, e.g. smoke | busi,taef2 | ph2,bf16 (see configs/gms.py). Training resumes\n"
  "from the latest checkpoint in DIR when DIR holds a run of the same config (a different\n"
  "model, data or schedule is refused); DIR/metrics.jsonl, DIR/tensorboard, DIR/config.json."
)


def parse(argv: list[str], *, check_paths: bool = True):
  """``(config, workdir)`` from the arguments (without the program name), or None for --help.
  Loads the config (any ``--config.KEY=VALUE`` applied) and validates it; reads nothing else."""
  argv = list(argv)
  if any(a in ("-h", "--help", "-help") for a in argv):
    return None
  argv = configuration.resolve_config_argv(argv)
  full = ["gms-jax train"] + argv
  fv = flags.FlagValues()
  cfg = config_flags.DEFINE_config_file(
    "config",
    None,
    "training config: NAME or configs/gms.py:NAME",
    flag_values=fv,
    lock_config=True,
    sys_argv=full,
  )
  workdir = flags.DEFINE_string(
    "workdir", None, "checkpoints, logs and config.json", flag_values=fv
  )
  try:
    extra = fv(full)
    config = cfg.value
  except Exception as e:  # absl/ml_collections raise many types
    raise configuration.flag_error(argv, e, USAGE) from None
  if len(extra) > 1:
    raise errors.UsageError(f"unexpected arguments {extra[1:]}; {USAGE}")
  if config is None or not workdir.value:
    raise errors.UsageError(f"--config and --workdir are required; {USAGE}")
  # before any logging or work (again with devices in training)
  configuration.validate(config, check_paths=check_paths)
  return config, workdir.value


def main(argv: list[str] | None = None) -> int:
  """``argv[0]`` is the program name, the rest are flags. Errors are raised (as
  :class:`gms_jax.errors.GmsError` where they are the user's to fix); ``gms_jax.cli`` prints them
  as one line."""
  argv = list(sys.argv if argv is None else argv)
  parsed = parse(argv[1:])
  if parsed is None:
    print(f"{USAGE}\n\n{HELP}")
    return 0
  config, workdir = parsed
  resolve_classes(config)  # dataset.json labels: one line on a problem, before any logging
  configuration.validate(config)  # with the data's classes
  check_workdir(config, os.path.abspath(workdir))
  WorkdirLock(workdir, "train").check()  # a busy workdir: one line, before any logging
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  quiet_library_logs()
  parallel.initialize_distributed(config.distributed)
  logging.info(
    "JAX process %d/%d, local devices %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  train_and_evaluate(config, workdir)
  return 0
