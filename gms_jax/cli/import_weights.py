"""``gms-jax import``: parse, then :func:`gms_jax.pretrained.import_workdir`."""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from gms_jax import configuration, errors
from gms_jax.pretrained import import_workdir

IMPORT_USAGE = (
  "usage: gms-jax import --config NAME[,modifiers] [--config.key=value ...] "
  "--mapper PATH --workdir DIR"
)


IMPORT_HELP = """
Writes a new workdir (refused if --workdir exists and is not empty) holding the mapper weights as
step 0, with the config's tokenizer, that `gms-jax evaluate`, `predict`, `export` and `train`
(resume = fine-tune; pass the training options here) accept like a trained run.

  --config    the training config (configs/gms.py:NAME), with any --config.key=value overrides;
              config.mapper.ch / ch_mult are taken from the weights
  --mapper    official GMS best_model.pth, the same state dict as .safetensors, a
              `gms-jax convert --format gms-mapper` output, or a workdir (its best checkpoint)
  --workdir   the new workdir
"""


def parse(argv: list[str] | None = None, *, check_paths: bool = True):
  """``(config, mapper, workdir)`` from the arguments, or None for --help; the config is loaded
  (overrides applied) and validated; nothing else is read."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help", "-help") for a in argv):
    return None
  argv = configuration.resolve_config_argv(argv)
  spec = configuration.config_spec(argv)
  if spec and not os.path.isfile(spec.partition(":")[0]):
    raise errors.ConfigError(f"--config {spec}: no such config file {spec.partition(':')[0]}")
  full = ["gms-jax import"] + argv
  fv = flags.FlagValues()
  cfg_flag = config_flags.DEFINE_config_file(
    "config",
    None,
    "training config, NAME or configs/gms.py:NAME",
    flag_values=fv,
    lock_config=True,
    sys_argv=full,
  )
  mapper = flags.DEFINE_string(
    "mapper",
    None,
    "mapper checkpoint: best_model.pth, a gms-jax convert output, or a workdir",
    flag_values=fv,
  )
  workdir = flags.DEFINE_string("workdir", None, "new workdir to create", flag_values=fv)
  try:
    extra = fv(full)
    config = cfg_flag.value
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    raise configuration.flag_error(argv, e, IMPORT_USAGE) from None
  if len(extra) > 1:
    raise errors.UsageError(f"unexpected arguments {extra[1:]}; {IMPORT_USAGE}")
  if config is None or not mapper.value or not workdir.value:
    raise errors.UsageError(f"--config, --mapper and --workdir are required; {IMPORT_USAGE}")
  configuration.validate(config, check_paths=check_paths)
  return config, mapper.value, workdir.value


def main(argv: list[str] | None = None) -> int:
  """``gms-jax import``: mapper checkpoint + the config's tokenizer -> a ready workdir.

  Errors are raised (:mod:`gms_jax.errors`); :func:`gms_jax.cli.main` prints them as one line."""
  parsed = parse(argv)
  if parsed is None:
    print(IMPORT_USAGE + "\n" + IMPORT_HELP)
    return 0
  config, mapper, workdir = parsed
  info = import_workdir(config, mapper, workdir)
  print(
    f"wrote {info['workdir']}: step 0 from {info['source']} ({info['format']}, sha256 "
    f"{info['sha256']}); mapper {info['mapper']['in_channels']}ch ch={info['mapper']['ch']}; "
    f"tokenizer {info['tokenizer']['name']} {info['tokenizer']['path'] or '(packaged)'}"
  )
  return 0
