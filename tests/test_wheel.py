"""An installed wheel (not the checkout) runs the main job from any folder.

``pip wheel .`` builds the package; it is installed, without its dependencies, into a fresh venv
that sees the test environment's pinned requirements (a ``.pth`` line to their site-packages, no
checkout on the path); from an empty temporary folder ``gms-jax train --config smoke`` (a bare
name: the packaged configs) trains on the packaged sample and ``gms-jax evaluate`` evaluates it.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_trains_and_evaluates_from_any_folder(tmp_path):
  # Built from a copy of the sources: a build writes build/ and *.egg-info/ beside setup.cfg.
  src = tmp_path / "src"
  shutil.copytree(
    REPO,
    src,
    symlinks=True,
    ignore=shutil.ignore_patterns(
      ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "runs", "workdirs"
    ),
  )
  wheels = tmp_path / "wheels"
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--no-deps",
      "--no-build-isolation",
      "-q",
      "-w",
      str(wheels),
      str(src),
    ],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  (wheel,) = wheels.glob("gms_jax-*.whl")
  venv = tmp_path / "venv"
  subprocess.run(
    [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
  )
  py = venv / "bin" / "python"
  purelib = Path(
    subprocess.check_output(
      [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
  )
  # The pinned requirements of this environment, but not its gms_jax (editable or not).
  deps = {
    sysconfig.get_paths()["purelib"],
    sysconfig.get_paths()["platlib"],
    *site.getsitepackages(),
  }
  (purelib / "_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "install",
      "-q",
      "--no-deps",
      "--target",
      str(purelib),
      str(wheel),
    ],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  scripts = tmp_path / "bin"
  scripts.mkdir()
  gms = scripts / "gms-jax"
  gms.write_text(f"#!{py}\nimport sys\nfrom gms_jax.cli import main\nsys.exit(main())\n")
  gms.chmod(0o755)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GMS_JAX_VERBOSE")}
  env["JAX_PLATFORMS"] = "cpu"
  where = subprocess.check_output(
    [str(py), "-c", "import gms_jax; print(gms_jax.__file__)"], cwd=elsewhere, env=env, text=True
  ).strip()
  assert Path(where).is_relative_to(purelib), where  # the wheel's copy, not the checkout's
  workdir = tmp_path / "run"
  p = subprocess.run(
    [
      str(gms),
      "train",
      "--config",
      "smoke",
      "--workdir",
      str(workdir),
      f"--config.data.tfds_dir={tmp_path / 'tfds'}",
    ],
    cwd=elsewhere,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert p.returncode == 0, p.stderr[-4000:]
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["name"] == "sample" and config["tokenizer"]["name"] == "taef2"
  p = subprocess.run(
    [str(gms), "evaluate", "--workdir", str(workdir)],
    cwd=elsewhere,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert p.returncode == 0, p.stderr[-4000:]
  summary = json.loads((workdir / "eval" / "sample-test" / "summary.json").read_text())
  assert "sample/test: n=8" in p.stdout and summary  # the packaged sample's test split
  assert not any(elsewhere.iterdir())  # nothing written into the working folder
