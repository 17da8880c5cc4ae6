"""``gms-jax`` command line: one thin module per command (``gms_jax/cli/<command>.py``: parse the
arguments, then one library call); this module dispatches and turns every error into one line."""

from __future__ import annotations

import os
import sys
import traceback

USAGE = """usage: gms-jax <command> [args]

commands:
  train       train the latent mapper       gms-jax train --config smoke --workdir runs/smoke
  evaluate    evaluate a trained workdir    gms-jax evaluate --workdir runs/smoke [--dataset NAME] [--split test]
  predict     segment image files/folders   gms-jax predict --workdir runs/smoke IMAGES... --out DIR
  convert     PyTorch weights -> Flax       gms-jax convert --format {diffusers,ldm,gms-mapper,tae} SRC OUT
  import      mapper weights -> a workdir   gms-jax import --config busi --mapper best_model.pth --workdir DIR
  export      workdir -> official .pth     gms-jax export --workdir DIR [--format pth|safetensors] OUT
  check-data  validate a dataset folder     gms-jax check-data PATH
  plot        validation Dice vs minutes    gms-jax plot WORKDIR... --out curves.png
  compile     AOT-compile for a TPU/GPU     gms-jax compile --config busi --target v4-8 [--json OUT]

`gms-jax <command> --help` for each command's options. Errors are one line on stderr (exit 2:
usage or config, 1: data or other failures); `--verbose` (or GMS_JAX_VERBOSE=1) adds the traceback.
"""

# command -> (module, function); imported lazily so `gms-jax convert --help` does not import jax.
COMMANDS = {
  "train": ("gms_jax.cli.train", "main"),
  "evaluate": ("gms_jax.cli.evaluate", "main"),
  "predict": ("gms_jax.cli.predict", "main"),
  "convert": ("gms_jax.cli.convert", "main"),
  "import": ("gms_jax.cli.import_weights", "main"),
  "export": ("gms_jax.cli.export", "main"),
  "check-data": ("gms_jax.cli.check_data", "main"),
  "plot": ("gms_jax.cli.plot", "main"),
  "compile": ("gms_jax.cli.compile", "main"),
}


def _verbose(argv: list[str]) -> tuple[list[str], bool]:
  """Removes ``--verbose`` from ``argv``; verbose if it was there or ``GMS_JAX_VERBOSE`` is set."""
  env = os.environ.get("GMS_JAX_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")
  rest = [a for a in argv if a != "--verbose"]
  return rest, env or len(rest) != len(argv)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  cmd, (rest, verbose) = argv[0], _verbose(argv[1:])
  if cmd not in COMMANDS:
    print(
      f"gms-jax: error: unknown command {cmd!r} (commands: {', '.join(COMMANDS)}; "
      "see gms-jax --help)",
      file=sys.stderr,
    )
    return 2
  import importlib

  from gms_jax import errors

  module_name, fn = COMMANDS[cmd]
  try:
    func = getattr(importlib.import_module(module_name), fn)
    if cmd == "train":
      # absl-style entry point: argv[0] is the program name, the rest are absl flags.
      rc = func([f"gms-jax {cmd}"] + rest)
    else:
      rc = func(rest)
  except KeyboardInterrupt:
    print(f"gms-jax {cmd}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # the one place errors become one line
    if verbose:
      traceback.print_exc()
    print(f"gms-jax {cmd}: error: {errors.describe(e)}", file=sys.stderr)
    return errors.exit_code(e)
  return int(rc or 0)


if __name__ == "__main__":
  sys.exit(main())
