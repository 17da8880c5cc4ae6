"""Interrupted training: SIGKILL, then SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption
notice) alternately at five random steps of one smoke run (new steps every run), each followed
by a restart of the same command.

* SIGINT / SIGTERM stop at the next step boundary with a checkpoint: exit 130 / 143, one line
  naming the signal and the step, no traceback; the checkpoint is that step.
* After a SIGKILL between checkpoints, the rows the killed run logged past its last checkpoint are
  removed on resume: ``metrics.jsonl`` holds one row per step after any number of resumes.
* The run finished through all those interruptions logs the same per-step losses and validation
  Dice as an uninterrupted run of the same command (recorded in ``fixtures/``, as in
  ``test_one_trainer.py``).
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import _train_helpers as H
import pytest
from conftest import cli_env, gms_jax_command

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "smoke_before_one_trainer.json"
PROGRESS = re.compile(r"step (\d+)/30: loss")


def _run_until(args, env, *, at_step: int | None, sig: int | None, timeout: float = 300):
  """Runs the command; when its progress line for ``at_step`` appears, sends ``sig``."""
  p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines: list[str] = []
  sent = []

  def read():
    for line in p.stderr:
      lines.append(line)
      m = PROGRESS.search(line)
      if sig is not None and not sent and m and int(m.group(1)) >= at_step and p.poll() is None:
        p.send_signal(sig)
        sent.append(int(m.group(1)))

  t = threading.Thread(target=read, daemon=True)
  t.start()
  try:
    p.wait(timeout=timeout)
  finally:
    if p.poll() is None:
      p.kill()
  t.join(timeout=10)
  return p.returncode, "".join(lines)


def _smoke_train(tmp_path, workdir):
  """The smoke train command on ``workdir`` (a progress line per step) and its environment (a
  persistent compilation cache, so restarts do not compile again)."""
  args = gms_jax_command() + [
    "train", "--config", f"{REPO / 'configs' / 'gms.py'}:smoke", "--workdir", str(workdir),
    f"--config.data.tfds_dir={tmp_path / 'tfds'}", "--config.log_every_steps=1",
  ]  # fmt: skip
  env = cli_env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jaxcache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # fmt: skip
  return args, env


@pytest.mark.slow
def test_kill_int_term_at_random_steps_then_resume_equals_uninterrupted(tmp_path):
  from gms_jax import run_metadata

  rng = random.Random(time.time_ns())
  workdir = tmp_path / "w"
  args, env = _smoke_train(tmp_path, workdir)
  # SIGKILL after the step-15 checkpoint, then SIGINT and SIGTERM alternately at five random
  # later steps (new ones every run), each followed by a restart of the same command.
  kill_at = rng.randint(17, 20)
  later = sorted(rng.sample(range(kill_at - 1, 29), 5))
  plan = [(signal.SIGKILL, kill_at)] + [
    (signal.SIGINT if i % 2 == 0 else signal.SIGTERM, at) for i, at in enumerate(later)
  ]
  stopped_at = []
  for sig, at in plan:
    rc, err = _run_until(args, env, at_step=at, sig=sig)
    where = f"{sig.name} at step >= {at}: rc {rc}\n{err[-3000:]}"
    if sig == signal.SIGKILL:
      assert rc == -9, where
      continue
    assert rc == 128 + int(sig), where
    assert "Traceback" not in err and "Exception ignored" not in err, where
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    m = re.match(rf"gms-jax train: error: interrupted by {sig.name} at step (\d+) of 30: "
                 r"checkpoint (\d+) saved in .*; run the same command to resume$", last)  # fmt: skip
    assert m and m.group(1) == m.group(2), where
    stopped_at.append(int(m.group(1)))
    _, _, step = run_metadata.restore_mapper(str(workdir), "latest")
    assert step == stopped_at[-1] >= at
  rc, err = _run_until(args, env, at_step=None, sig=None)
  assert rc == 0, err[-3000:]

  rows = H.read_jsonl(workdir / "metrics.jsonl")
  steps = [r["step"] for r in rows if "train/loss" in r]
  assert steps == list(range(1, 31)), steps  # one row per step, none repeated or missing
  assert sum(1 for r in rows if r.get("event") == "start") == len(plan) + 1
  fixture = json.loads(FIXTURE.read_text())["exact"]
  same_host = run_metadata.cpu_info()["simd"] == json.loads(FIXTURE.read_text())["host_simd"]
  tol = 1e-6 if same_host else 1e-4
  for r in rows:
    if "train/loss" in r:
      assert r["train/loss"] == pytest.approx(fixture["loss"][str(r["step"])], rel=tol, abs=tol)
  dice = {r["step"]: r["eval/val_dice"] for r in rows if "eval/val_dice" in r}
  assert sorted(dice) == [15, 30]
  assert dice[30] == pytest.approx(fixture["val_dice"]["30"], abs=tol if same_host else 2e-3)


@pytest.mark.slow
def test_a_second_train_on_a_busy_workdir_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
  import socket
  import sys

  from gms_jax.layout import LOCK_FILE

  workdir = tmp_path / "w"
  args, env = _smoke_train(tmp_path, workdir)
  first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  err_first: list[str] = []
  started = threading.Event()

  def read():
    for line in first.stderr:
      err_first.append(line)
      if PROGRESS.search(line):
        started.set()

  t = threading.Thread(target=read, daemon=True)
  t.start()
  try:
    assert started.wait(timeout=300), "".join(err_first)[-3000:]
    holder = json.loads((workdir / LOCK_FILE).read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    lines = [ln for ln in second.stderr.splitlines() if ln.strip() and "cudart" not in ln]
    assert len(lines) == 1 and "Traceback" not in second.stderr, lines
    for fact in ("in use by gms-jax train", socket.gethostname(), f"PID {first.pid}", "since"):
      assert fact in lines[0], lines[0]
    first.wait(timeout=600)
  finally:
    if first.poll() is None:
      first.kill()
  t.join(timeout=10)
  assert first.returncode == 0, "".join(err_first)[-3000:]
  assert not (workdir / LOCK_FILE).exists()  # released on a clean exit
  # The first run finished as it would alone (the uninterrupted run recorded in fixtures/).
  rows = H.read_jsonl(workdir / "metrics.jsonl")
  fixture = json.loads(FIXTURE.read_text())
  from gms_jax import run_metadata

  tol = 1e-6 if run_metadata.cpu_info()["simd"] == fixture["host_simd"] else 1e-4
  losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  assert sorted(losses) == list(range(1, 31))
  for step, loss in losses.items():
    assert loss == pytest.approx(fixture["exact"]["loss"][str(step)], rel=tol, abs=tol)

  # A lock left by a process that is gone (SIGKILL) is taken over with a warning.
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)  # fmt: skip
  (workdir / LOCK_FILE).write_text(json.dumps({
    "host": socket.gethostname(), "pid": int(gone.stdout), "since": "earlier", "command": "train"}))  # fmt: skip
  again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "stale lock" in again.stderr and "taking it over" in again.stderr
  assert not (workdir / LOCK_FILE).exists()
