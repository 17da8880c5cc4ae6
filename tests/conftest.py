"""Session fixtures shared by the end-to-end tests.

The suite runs on CPU (fake CPU devices where it needs several): with the ``[tpu]`` or
``[cuda-aot]`` extra installed, jax would otherwise try to start those backends in every test
process (libtpu looks for a TPU VM and prints warnings). Set ``JAX_PLATFORMS`` to override."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]


def gms_jax_command() -> list[str]:
  """The installed ``gms-jax`` console script (beside this Python), else ``python -m gms_jax.cli``."""
  script = Path(sys.executable).parent / "gms-jax"
  return [str(script)] if script.is_file() else [sys.executable, "-m", "gms_jax.cli"]


def cli_env(**extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  env.pop("GMS_JAX_VERBOSE", None)
  env.update(extra)
  return env


def run_cli(*args, timeout: float = 600, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
    gms_jax_command() + [str(a) for a in args],
    env=cli_env(**env),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """``gms-jax train --config configs/gms.py:smoke`` once per session (stderr is not a TTY).

  Returns ``(workdir, tfds_dir, completed_process)``; tests must not modify the workdir."""
  from gms_jax import tokenizers

  try:
    tokenizers.packaged_path("taef2")
  except FileNotFoundError as e:
    pytest.skip(f"packaged TAEF2 weights missing: {e}")
  root = tmp_path_factory.mktemp("smoke")
  workdir, tfds = root / "smoke", root / "tfds"
  p = run_cli(
    "train",
    "--config",
    f"{REPO / 'configs' / 'gms.py'}:smoke",
    "--workdir",
    workdir,
    f"--config.data.tfds_dir={tfds}",
    timeout=600,
  )
  assert p.returncode == 0, p.stderr[-6000:]
  return workdir, str(tfds), p


@pytest.fixture(scope="session")
def multiclass_runs(tmp_path_factory):
  """A synthetic 3-class dataset (tests/_multiclass_data.py: a square and a disc in one image)
  and one smoke-sized run of each recipe on it (the real TAEF2 at 64², the "out" head's Dice
  only, to keep the decoder cheap). Returns ``{"root", "tfds", "exact", "fast"}`` (workdirs);
  tests must not modify them."""
  from _multiclass_data import make_dataset

  from gms_jax import tokenizers

  try:
    tokenizers.packaged_path("taef2")
  except FileNotFoundError as e:
    pytest.skip(f"packaged TAEF2 weights missing: {e}")
  base = tmp_path_factory.mktemp("multiclass")
  root = make_dataset(base / "shapes")
  tfds = base / "tfds"
  common = [
    f"--config.data.root={root}",
    f"--config.data.tfds_dir={tfds}",
    "--config.data.image_size=64",
    "--config.loss.heads=('out',)",
  ]
  runs = {"root": root, "tfds": str(tfds)}
  for recipe, extra in (
    ("exact", ["--config.num_epochs=8", "--config.eval_every_steps=16"]),
    (
      "fast",
      ["--config.num_epochs=14", "--config.fast.dice_steps=20", "--config.eval_every_steps=28"],
    ),
  ):
    config = "folder,smoke" + (",fast" if recipe == "fast" else "")
    workdir = base / recipe
    p = run_cli("train", "--config", config, "--workdir", workdir, *common, *extra, timeout=900)
    assert p.returncode == 0, p.stderr[-6000:]
    runs[recipe] = workdir
  return runs
