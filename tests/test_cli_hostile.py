"""The console commands used as a hostile but fair user would, in subprocesses.

Each case asserts the exit code, that an error is ONE line on stderr naming the file/key, that no
traceback is printed, and that every file that must survive is byte-identical afterwards. The
smoke workdir is trained once per session (``conftest.smoke_run``) and never modified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli
from PIL import Image

SMOKE = f"{REPO / 'configs' / 'gms.py'}:smoke"
SAMPLE_IMAGES = sorted((REPO / "data" / "sample" / "images").iterdir())


def snapshot(*paths) -> dict[str, str]:
  """sha256 of every file under ``paths`` (recursively), keyed by path."""
  out = {}
  for p in map(Path, paths):
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
      out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
  return out


def error_line(p, *, code: int, names: tuple[str, ...] = (), only_line: bool = True) -> str:
  """Asserts a one-line error with exit ``code`` mentioning every string in ``names``."""
  assert p.returncode == code, (p.returncode, p.stderr[-3000:])
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  errors = [ln for ln in lines if ": error: " in ln]
  assert len(errors) == 1, lines[-10:]
  if only_line:
    assert lines == errors, lines[-10:]
  for n in names:
    assert n in errors[0], (n, errors[0])
  return errors[0]


@pytest.fixture()
def images(tmp_path):
  """imgs/a/x.png and imgs/b/x.png (same name, different folders) and a corrupt imgs/b/bad.png."""
  root = tmp_path / "imgs"
  (root / "a").mkdir(parents=True)
  (root / "b").mkdir()
  shutil.copy(SAMPLE_IMAGES[0], root / "a" / "x.png")
  shutil.copy(SAMPLE_IMAGES[1], root / "b" / "x.png")
  return root


# ----------------------------------------------------------------------------- 1. evaluate --out


def test_evaluate_refuses_a_foreign_out_and_the_workdir(smoke_run, tmp_path):
  workdir, _, _ = smoke_run
  out = tmp_path / "mine"
  out.mkdir()
  (out / "sentinel.txt").write_text("keep me")
  before = snapshot(out, workdir)
  for target in (out, workdir, tmp_path):  # a user's folder, the workdir, a parent of both
    p = run_cli("evaluate", "--workdir", workdir, "--out", target)
    error_line(p, code=2, names=(str(target), "not written by gms-jax evaluate"))
  assert snapshot(out, workdir) == before


def test_evaluate_replaces_only_its_own_output(smoke_run, tmp_path):
  workdir, _, _ = smoke_run
  out = tmp_path / "eval"
  user_tmp = tmp_path / "eval.tmp"  # the old code deleted <out>.tmp
  user_tmp.mkdir()
  (user_tmp / "notes.txt").write_text("mine")
  for _ in range(2):  # the second run replaces the first (its own output)
    p = run_cli("evaluate", "--workdir", workdir, "--out", out, "--split", "val")
    assert p.returncode == 0, p.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["split"] == "validation" and summary["n"] == 3
  assert len(list((out / "masks").iterdir())) == 3
  assert (user_tmp / "notes.txt").read_text() == "mine"
  assert sorted(os.listdir(tmp_path)) == ["eval", "eval.tmp"]  # no staging folders left
  # once the user adds a file, the folder is no longer only ours: refused, file kept
  (out / "masks" / "extra.txt").write_text("mine")
  before = snapshot(out)
  p = run_cli("evaluate", "--workdir", workdir, "--out", out, "--split", "valid")
  error_line(p, code=2, names=(str(out), "did not write", "extra.txt"))
  assert snapshot(out) == before


def test_evaluate_bad_arguments_are_one_line_and_leave_nothing(smoke_run, tmp_path):
  workdir, _, _ = smoke_run
  out = tmp_path / "ev"
  error_line(
    run_cli("evaluate", "--workdir", workdir, "--out", out, "--batch-size", "0"),
    code=2,
    names=("--batch-size",),
  )
  error_line(
    run_cli("evaluate", "--workdir", workdir, "--out", out, "--checkpoint", "foo"),
    code=2,
    names=("--checkpoint", "'foo'"),
  )
  error_line(
    run_cli("evaluate", "--workdir", workdir, "--out", out, "--split", "bogus"),
    code=2,
    names=("--split",),
  )
  assert os.listdir(tmp_path) == []  # no <out>, no <out>.tmp
  empty = tmp_path / "empty"
  empty.mkdir()
  error_line(
    run_cli("evaluate", "--workdir", tmp_path / "missing"),
    code=2,
    names=(str(tmp_path / "missing"), "no such folder"),
  )
  error_line(
    run_cli("evaluate", "--workdir", empty), code=2, names=(str(empty), "not a gms-jax workdir")
  )
  (empty / "config.json").write_text("{}")
  error_line(run_cli("evaluate", "--workdir", empty), code=2, names=(str(empty), "no checkpoint"))
  assert os.listdir(empty) == ["config.json"]


# ----------------------------------------------------------------------------- 2./3. predict


def test_predict_refuses_outputs_that_overlap_its_inputs(smoke_run, images, tmp_path):
  workdir, _, _ = smoke_run
  before = snapshot(images)
  for out in (images, images / "a" / "masks", tmp_path, images / "a"):
    p = run_cli("predict", "--workdir", workdir, images, "--out", out)
    error_line(p, code=2, names=(str(out), "overlaps the input"))
  # a single file as input: its own folder contains it
  p = run_cli("predict", "--workdir", workdir, images / "a" / "x.png", "--out", images / "a")
  error_line(p, code=2, names=("overlaps the input",))
  assert snapshot(images) == before
  assert sorted(p.name for p in images.rglob("*")) == ["a", "b", "x.png", "x.png"]


def test_predict_keeps_relative_paths_and_counts_what_is_on_disk(smoke_run, images, tmp_path):
  workdir, _, _ = smoke_run
  out = tmp_path / "out"
  p = run_cli("predict", "--workdir", workdir, images, "--out", out)
  assert p.returncode == 0, p.stderr[-3000:]
  masks = sorted(str(f.relative_to(out)) for f in out.rglob("*.png"))
  assert masks == ["a/x.png", "b/x.png"]
  assert "wrote 2 masks" in p.stdout
  for name in masks:  # native size, binary, the user's umask (not mkstemp's 0600)
    m = np.asarray(Image.open(out / name))
    src = np.asarray(Image.open(images / name))
    assert m.shape == src.shape[:2] and set(np.unique(m)) <= {0, 255}
    mode = stat.S_IMODE((out / name).stat().st_mode)
    assert mode == 0o666 & ~0o022, oct(mode)  # conftest runs under the default umask 022
  # two files in one folder with the same stem keep their extensions
  jpg = images / "a" / "x.jpg"
  Image.open(images / "a" / "x.png").convert("RGB").save(jpg)
  out2 = tmp_path / "out2"
  p = run_cli("predict", "--workdir", workdir, images / "a", "--out", out2)
  assert p.returncode == 0, p.stderr[-3000:]
  assert sorted(f.name for f in out2.glob("*.png")) == ["x.jpg.png", "x.png.png"]
  assert "wrote 2 masks" in p.stdout
  # running again into its own output is fine; into a user's non-empty folder is not
  p = run_cli("predict", "--workdir", workdir, images / "a", "--out", out2)
  assert p.returncode == 0, p.stderr[-3000:]
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "x.png").write_bytes(b"user data")
  p = run_cli("predict", "--workdir", workdir, images, "--out", mine)
  error_line(p, code=2, names=(str(mine), "not written by gms-jax predict"))
  assert (mine / "x.png").read_bytes() == b"user data"


def test_one_bad_image_costs_only_itself(smoke_run, images, tmp_path):
  workdir, _, _ = smoke_run
  (images / "b" / "bad.png").write_bytes(b"not an image")
  (images / "b" / "empty.jpg").write_bytes(b"")
  out = tmp_path / "out"
  p = run_cli("predict", "--workdir", workdir, images, "--out", out)
  assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
  assert sorted(str(f.relative_to(out)) for f in out.rglob("*.png")) == ["a/x.png", "b/x.png"]
  lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
  assert len(lines) == 3, lines
  assert any("skipped" in ln and "bad.png" in ln for ln in lines)
  assert any("skipped" in ln and "empty.jpg" in ln for ln in lines)
  assert "2 of 4 images skipped" in lines[-1]
  assert "wrote 2 masks" in p.stdout


def test_predict_bad_arguments(smoke_run, images, tmp_path):
  workdir, _, _ = smoke_run
  out = tmp_path / "out"
  error_line(
    run_cli("predict", "--workdir", workdir, images, "--out", out, "--checkpoint", "foo"),
    code=2,
    names=("--checkpoint", "'foo'"),
  )
  error_line(
    run_cli("predict", "--workdir", workdir, tmp_path / "nope.png", "--out", out),
    code=2,
    names=("nope.png", "no such file"),
  )
  error_line(
    run_cli("predict", "--workdir", tmp_path / "nowork", images, "--out", out),
    code=2,
    names=("nowork", "no such folder"),
  )
  error_line(
    run_cli("predict", "--workdir", workdir, images, "--out", out, "--batch-size", "0"),
    code=2,
    names=("--batch-size",),
  )
  assert not out.exists()


# ----------------------------------------------------------------------------- 4. train workdirs


@pytest.mark.parametrize(
  "overrides,keys",
  [
    (["--config.data.image_size=64"], ["data.image_size: 32 -> 64"]),
    (["--config.mapper.ch=16"], ["mapper.ch: 32 -> 16"]),
    (["--config.num_epochs=20", "--config.seed=1"], ["num_epochs: 10 -> 20", "seed: 2333 -> 1"]),
  ],
)
def test_train_refuses_a_workdir_of_another_config(smoke_run, overrides, keys):
  workdir, tfds, _ = smoke_run
  before = snapshot(workdir)
  p = run_cli(
    "train", "--config", SMOKE, "--workdir", workdir, f"--config.data.tfds_dir={tfds}", *overrides
  )
  error_line(p, code=2, names=(str(workdir), "another config", *keys))
  assert snapshot(workdir) == before


def test_train_resume_allows_harmless_keys(smoke_run, tmp_path):
  """Changing only logging cadence and workers is accepted: the run is complete, so it resumes at
  step 30 and ends without training (nothing in the workdir but new log lines changes)."""
  workdir, tfds, _ = smoke_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  before = snapshot(copy / "checkpoints", copy / "config.json")
  p = run_cli(
    "train",
    "--config",
    SMOKE,
    "--workdir",
    copy,
    f"--config.data.tfds_dir={tfds}",
    "--config.log_every_steps=1",
    "--config.data.worker_count=0",
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resumed from step 30" in p.stderr
  assert snapshot(copy / "checkpoints", copy / "config.json") == before


def test_train_refuses_a_folder_that_is_not_a_workdir(tmp_path):
  folder = tmp_path / "home"
  folder.mkdir()
  (folder / "config.txt").write_text("mine")
  p = run_cli("train", "--config", SMOKE, "--workdir", folder)
  error_line(p, code=2, names=(str(folder), "not a gms-jax workdir"))
  assert os.listdir(folder) == ["config.txt"]


def test_failed_train_leaves_no_workdir(tmp_path):
  """A truncated weights file fails before the first step: one error line (not two), and the
  workdir is gone (new) or as it was (empty)."""
  trunc = tmp_path / "vae.safetensors"
  from gms_jax import tokenizers

  trunc.write_bytes(Path(tokenizers.packaged_path("taef2")).read_bytes()[:1000])
  empty = tmp_path / "empty"
  empty.mkdir()
  for workdir in (tmp_path / "new", empty):
    p = run_cli(
      "train",
      "--config",
      SMOKE,
      "--workdir",
      workdir,
      "--config.tokenizer.name=sd-vae",
      f"--config.tokenizer.path={trunc}",
      f"--config.data.tfds_dir={tmp_path / 'tfds'}",
    )
    error_line(p, code=2, names=("config.tokenizer.path", str(trunc)), only_line=False)
  assert not (tmp_path / "new").exists()
  assert os.listdir(empty) == []


def test_release_workdir_removes_only_what_a_run_writes(tmp_path):
  """A run that fails before its first step removes its own entries and nothing else: a file
  that appeared meanwhile survives byte-identical, in a created folder and in a pre-existing one."""
  from gms_jax import train

  for name, created in (("created", True), ("existing", False)):
    workdir = tmp_path / name
    (workdir / "checkpoints" / "0").mkdir(parents=True)
    (workdir / "tensorboard").mkdir()
    for f in ("config.json", "metrics.jsonl", "tensorboard/events"):
      (workdir / f).write_text("run")
    (workdir / "notes.txt").write_text("user")
    train.release_workdir(str(workdir), [str(workdir)] if created else [])
    assert os.listdir(workdir) == ["notes.txt"]
    assert (workdir / "notes.txt").read_text() == "user"
  fresh = tmp_path / "fresh"
  (fresh / "checkpoints").mkdir(parents=True)
  (fresh / "config.json").write_text("run")
  train.release_workdir(str(fresh), [str(fresh)])
  assert not fresh.exists()


# ----------------------------------------------------------------------------- 7. config errors


@pytest.mark.parametrize(
  "args,names",
  [
    (["--config.precision=float16"], ["config.precision", "float16"]),
    (["--config.batch_size=0"], ["config.batch_size"]),
    (["--config.data.image_size=30"], ["config.data.image_size", "multiple of 8"]),
    (["--config.tokenizer.name=bogus"], ["config.tokenizer.name", "bogus"]),
    (["--config.tokenizer.path=/no/such/vae.ckpt"], ["config.tokenizer.path", "/no/such/vae.ckpt"]),
    (["--config.optimizer.lr=1e6"], ["config.optimizer.lr", "config.optimizer.learning_rate"]),
    (["--config.data.rooot=x"], ["config.data.rooot", "config.data.root"]),
    (["--config.batch_size=abc"], ["batch_size", "abc"]),
    (["--config.optimizer.learning_rate=-1"], ["config.optimizer.learning_rate"]),
    (["--config.loss.noise_prob=2"], ["config.loss.noise_prob"]),
  ],
)
def test_train_config_errors_are_one_line_before_any_work(tmp_path, args, names):
  workdir = tmp_path / "w"
  p = run_cli(
    "train",
    "--config",
    SMOKE,
    "--workdir",
    workdir,
    f"--config.data.tfds_dir={tmp_path / 'tfds'}",
    *args,
  )
  error_line(p, code=2, names=tuple(names))
  assert os.listdir(tmp_path) == []  # no workdir, no dataset build


def test_unknown_config_name_and_missing_flags(tmp_path):
  error_line(
    run_cli(
      "train", "--config", f"{REPO / 'configs' / 'gms.py'}:bogus", "--workdir", tmp_path / "w"
    ),
    code=2,
    names=("bogus", "unknown dataset"),
  )
  error_line(run_cli("train", "--config", SMOKE), code=2, names=("--workdir",))
  error_line(run_cli("nonsense"), code=2, names=("nonsense",))
  # --verbose brings the traceback back
  p = run_cli(
    "train", "--config", SMOKE, "--workdir", tmp_path / "w", "--config.batch_size=0", "--verbose"
  )
  assert p.returncode == 2 and "Traceback" in p.stderr
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- progress logging


def test_training_logs_progress_when_stderr_is_not_a_terminal(smoke_run):
  _, _, p = smoke_run  # the fixture's stderr is a pipe
  lines = [ln for ln in p.stderr.splitlines() if "ETA" in ln]
  assert len(lines) == 6, lines  # 30 steps, log_every_steps=5
  assert "step 5/30: loss" in lines[0] and "step 30/30" in lines[-1]
  assert "val Dice n/a" in lines[0] and "val Dice 0." in lines[-1]


# ----------------------------------------------------------------------------- convert


def test_convert_never_replaces_a_file_and_writes_with_the_umask(tmp_path):
  out = tmp_path / "vae.safetensors"
  out.write_bytes(b"user data")
  p = run_cli("convert", "--format", "ldm", tmp_path / "missing.ckpt", out)
  error_line(p, code=2, names=(str(out), "exists"))
  assert out.read_bytes() == b"user data"
  p = run_cli("convert", "--format", "ldm", tmp_path / "missing.ckpt", tmp_path / "new.safetensors")
  error_line(p, code=1, names=("missing.ckpt",))
  assert not (tmp_path / "new.safetensors").exists()
  from gms_jax.convert import core

  path = tmp_path / "p.safetensors"
  core.save_params(str(path), {"a": np.zeros((2,), np.float32)}, family="mapper", config={})
  assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~0o022
