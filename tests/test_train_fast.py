"""The ``fast`` recipe end to end (`gms-jax train --config configs/gms.py:smoke,fast`), its
bank refusal at the command line, and `gms-jax plot`.

The smoke run trains on the shipped sample with the packaged TAEF2 tokenizer at 32x32: 4 views
per image are banked, 75 banked latent-only steps, then 3 with the Dice term (phase 2). It must
learn: the validation Dice beats predicting the whole image as foreground. A second invocation
reuses the bank (builds nothing) and the checkpoint. A run killed with SIGKILL after a checkpoint
resumes to the parameters of an uninterrupted run (tiny tokenizer, subprocesses).
"""

from __future__ import annotations

import json
import subprocess
import sys

import _train_helpers as H
import numpy as np
import pytest
from test_train_smoke import _baseline_dice


def _train(workdir, tfds, cache, *extra, timeout=400):
  cmd = [
    sys.executable,
    "-m",
    "gms_jax.cli",
    "train",
    "--config",
    f"{H.REPO / 'configs' / 'gms.py'}:smoke,fast",
    "--workdir",
    str(workdir),
    f"--config.data.tfds_dir={tfds}",
    "--config.bank.num_views=4",
    "--config.eval_every_steps=25",
    "--config.log_every_steps=25",
    "--config.num_epochs=25",
    "--config.num_train_steps=75",
    *extra,
  ]
  return subprocess.run(
    cmd, env=H.subprocess_env(cache), capture_output=True, text=True, timeout=timeout, check=False
  )


@pytest.fixture(scope="module")
def packaged_taef2():
  from gms_jax import tokenizers

  try:
    tokenizers.packaged_path("taef2")
  except FileNotFoundError as e:
    pytest.skip(f"packaged TAEF2 weights missing: {e}")


@pytest.mark.slow
def test_fast_smoke_learns_reuses_bank_and_resumes(tmp_path, packaged_taef2):
  workdir, tfds, cache = tmp_path / "fast", str(tmp_path / "tfds"), str(tmp_path / "cache")
  p = _train(workdir, tfds, cache, "--config.fast.dice_steps=3")
  assert p.returncode == 0, p.stderr[-6000:]
  records = H.read_jsonl(workdir / "metrics.jsonl")
  start = [r for r in records if r.get("event") == "start"]
  assert len(start) == 1 and start[0]["recipe"] == "fast" and not start[0]["resumed"]
  bank = start[0]["bank"]
  assert bank["views"] == 4 and bank["built_now"] == 4 and bank["entries"] == 4 * 29
  manifest = json.loads((workdir / "bank" / "manifest.json").read_text())
  assert manifest["tokenizer"]["family"] == "tae" and manifest["image_size"] == 32
  losses = [
    (r["step"], r["train/loss"], r["train/dice_phase"]) for r in records if "train/loss" in r
  ]
  evals = [r for r in records if "eval/val_dice" in r]
  baseline = _baseline_dice(tfds, 32)
  print(
    f"\n[fast smoke] loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}; validation Dice "
    f"{[round(r['eval/val_dice'], 3) for r in evals]} vs all-foreground {baseline:.3f}"
  )
  assert [s for s, _, _ in losses] == [25, 50, 75, 78]
  assert all(np.isfinite(l) for _, l, _ in losses)
  assert [ph for _, _, ph in losses] == [0.0, 0.0, 0.0, 1.0]  # steps 76-78: phase 2
  lrs = {r["step"]: r["train/lr"] for r in records if "train/lr" in r}
  assert lrs[78] == pytest.approx(2e-4, rel=1e-6) and lrs[75] < lrs[50]  # window means
  phase1 = [l for _, l, ph in losses if ph == 0.0]
  assert phase1[-1] < 0.8 * phase1[0]
  assert evals[-1]["eval/val_dice"] > baseline + 0.1
  assert all("wall_time" in r for r in records)

  # a second invocation: the bank is reused as is, training resumes at step 78 (and is done)
  shard_times = {p.name: p.stat().st_mtime_ns for p in (workdir / "bank" / "shards").iterdir()}
  p = _train(workdir, tfds, cache, "--config.fast.dice_steps=3")
  assert p.returncode == 0, p.stderr[-6000:]
  records = H.read_jsonl(workdir / "metrics.jsonl")
  start = [r for r in records if r.get("event") == "start"]
  assert len(start) == 2 and start[1]["resumed"] and start[1]["step"] == 78
  assert start[1]["bank"]["built_now"] == 0
  assert shard_times == {
    p.name: p.stat().st_mtime_ns for p in (workdir / "bank" / "shards").iterdir()
  }
  assert max(r["step"] for r in records if "eval/val_dice" in r) == 78
  from gms_jax import run_metadata

  mapper, cfg, step = run_metadata.restore_mapper(str(workdir), "best")  # evaluate/predict's path
  assert cfg.recipe == "fast" and mapper.cfg.in_channels == 32 and step in (25, 50, 75, 78)

  # the wall-clock picture of this run; an existing --out is never replaced unasked
  out = tmp_path / "curves.png"
  cmd = [sys.executable, "-m", "gms_jax.cli", "plot", str(workdir), "--out", str(out)]
  p = subprocess.run(cmd, env=H.subprocess_env(), capture_output=True, text=True, timeout=120)
  assert p.returncode == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p.stderr
  before = out.read_bytes()
  p = subprocess.run(cmd, env=H.subprocess_env(), capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and "exists" in p.stderr and out.read_bytes() == before


def test_fast_resume_after_sigkill_equals_uninterrupted(tmp_path):
  """Banked steps 1-3, SIGKILL right after the step-3 checkpoint, restart: steps 4 (phase 1) and
  5-6 (phase 2) give the parameters and losses of an uninterrupted 6-step run."""
  over = {
    "recipe": "fast",
    "bank.num_views": 2,
    "num_train_steps": 4,
    "fast.dice_steps": 2,
    "checkpoint_every_steps": 3,
    "eval_every_steps": 3,
    "optimizer.eps": 1.0,
  }
  env = H.subprocess_env(str(tmp_path / "cache"))
  tfds = str(tmp_path / "tfds")

  def run(name, **kw):
    spec = {"workdir": str(tmp_path / name), "tfds_dir": tfds, "overrides": over, **kw}
    return H.run(spec, tmp_path / f"{name}.json", env=env)

  rc, out = run("reference")
  assert rc == 0, out[-5000:]
  rc, out = run("resumed", kill_after_save=3)
  assert rc == -9 and "KILLING after checkpoint 3" in out, out[-5000:]
  rc, out = run("resumed")
  assert rc == 0, out[-5000:]
  ref, res = H.train_losses(tmp_path / "reference"), H.train_losses(tmp_path / "resumed")
  assert sorted(ref) == sorted(res) == [1, 2, 3, 4, 5, 6]
  for s in (4, 5, 6):
    assert res[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-7), (s, res[s], ref[s])
  p_ref, s_ref = H.params_at(tmp_path / "reference")
  p_res, s_res = H.params_at(tmp_path / "resumed")
  assert s_ref == s_res == 6
  worst = max(float(np.max(np.abs(p_ref[k] - p_res[k]))) for k in p_ref)
  assert worst <= 1e-6, worst
  records = H.read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
  starts = [r for r in records if r.get("event") == "start"]
  assert [r["resumed"] for r in starts] == [False, True] and starts[1]["bank"]["built_now"] == 0


def test_mismatched_bank_refused_at_the_command_line(tmp_path, packaged_taef2):
  """A bank built for another tokenizer: one error line, no traceback, nothing written to it."""
  bank_dir = tmp_path / "bank"
  bank_dir.mkdir()
  manifest = {"format": 1, "tokenizer": {"name": "sd-vae", "family": "sd-vae"}, "image_size": 32}
  (bank_dir / "manifest.json").write_text(json.dumps(manifest))
  p = _train(
    tmp_path / "run", str(tmp_path / "tfds"), None, f"--config.bank.dir={bank_dir}", timeout=300
  )
  assert p.returncode == 2
  assert "Traceback" not in p.stderr
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("gms-jax train: error: ") and "manifest.json" in last, last
  assert "tokenizer.name" in last, last
  assert sorted(x.name for x in bank_dir.iterdir()) == ["manifest.json"]
  assert not (tmp_path / "run").exists()  # the new workdir of the failed run is not left behind
  assert json.loads((bank_dir / "manifest.json").read_text()) == manifest


def test_plot_curve_counts_setup_and_skips_downtime(tmp_path):
  from gms_jax import plot

  lines = [
    {"step": 0, "wall_time": 1000.0, "event": "start", "setup_seconds": 60.0},
    {"step": 10, "wall_time": 1060.0, "eval/val_dice": 0.5},
    {"step": 20, "wall_time": 1120.0, "eval/val_dice": 0.6},  # killed here (2 min of work)
    {"step": 20, "wall_time": 5000.0, "event": "start", "setup_seconds": 30.0},
    {"step": 30, "wall_time": 5030.0, "eval/val_dice": 0.7},
  ]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  pts = plot.read_curve(tmp_path)
  # 1 min setup + 1 min, +1 min; after the restart 0.5 min setup + 0.5 min; the gap not counted
  assert pts == [(2.0, 0.5), (3.0, 0.6), (4.0, 0.7)]
  out = tmp_path / "c.png"
  plot.draw([("run", pts)], str(out))
  from PIL import Image

  assert Image.open(out).size == (960, 600)
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval/val_dice": 0.1}))
  with pytest.raises(plot.PlotError, match="wall_time"):
    plot.read_curve(tmp_path / "old")


def test_banked_step_ema_is_an_average_of_the_trained_weights():
  """With fast.ema_decay the optimizer's trajectory is unchanged and ``params`` is the EMA of it
  (decay min(d, (1+s)/(10+s))), computed here independently in numpy."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from gms_jax import step as step_lib
  from gms_jax.models.latent_mapper import MapperConfig, ResAttnUNet_DS

  config = H.load_config("sample,fast")
  schedule = lambda count: 1e-3  # noqa: E731
  tx = step_lib.make_optimizer(config, schedule)
  graphdef, state = nnx.split(ResAttnUNet_DS(MapperConfig(ch=16), rngs=nnx.Rngs(0)), nnx.Param)
  p0 = nnx.to_pure_dict(state)
  rng = np.random.default_rng(0)
  batch = {
    "z_image": rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
    "z_mask": rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
  }
  kw = step_lib.banked_loss_kwargs(config, dice=False, platform="cpu")
  decay = 0.5
  plain = jax.jit(step_lib.make_train_step(graphdef, None, tx, schedule, kw, banked=True))
  ema = jax.jit(
    step_lib.make_train_step(graphdef, None, tx, schedule, kw, ema_decay=decay, banked=True)
  )
  base = {"step": jnp.zeros((), jnp.int32), "opt_state": tx.init(p0), "rng": jax.random.PRNGKey(1)}
  s_plain = dict(base, params=p0)
  s_ema = dict(base, params=p0, train_params=p0)
  want = jax.tree.map(np.asarray, p0)
  for step in range(3):
    s_plain, _ = plain(s_plain, None, batch)
    s_ema, _ = ema(s_ema, None, batch)
    d = min(decay, (1 + step) / (10 + step))
    want = jax.tree.map(lambda e, w: d * e + (1 - d) * np.asarray(w), want, s_ema["train_params"])
  for a, b in zip(jax.tree.leaves(s_plain["params"]), jax.tree.leaves(s_ema["train_params"])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  moved = 0.0
  for got, w, t, init in zip(
    jax.tree.leaves(s_ema["params"]),
    jax.tree.leaves(want),
    jax.tree.leaves(s_ema["train_params"]),
    jax.tree.leaves(p0),
  ):
    np.testing.assert_allclose(got, w, rtol=0, atol=1e-6)
    moved = max(moved, float(np.max(np.abs(np.asarray(t) - np.asarray(init)))))
  assert moved > 1e-4  # the weights did move, so the average is not trivially the init


def test_fast_schedule_phase1_cosine_then_constant_phase2():
  from gms_jax import step as step_lib

  config = H.load_config("sample,fast")
  config.num_epochs, config.schedule.warmup_epochs = 10, 2
  config.fast.dice_learning_rate = 3e-4
  spe = 4
  sched = step_lib.make_fast_schedule(config, spe, phase1_steps=40)
  base = step_lib.make_schedule(config, spe)
  for step in (0, 3, 8, 20, 39):  # phase 1: the trainer's warm-up + cosine, unchanged
    assert float(sched(step)) == float(base(step))
  assert float(sched(39)) < 1e-5 and float(sched(8)) == pytest.approx(2e-3, rel=1e-6)
  for step in (40, 41, 100):
    assert float(sched(step)) == pytest.approx(3e-4, rel=1e-6)


def test_fast_config_keys_are_validated():
  from gms_jax import configuration, errors

  config = H.load_config("sample,fast")
  configuration.validate(config, check_tokenizer=False)
  for key, bad in (
    ("bank.num_views", 0),
    ("fast.dice_steps", -1),
    ("fast.ema_decay", 1.0),
    ("recipe", "quick"),
  ):
    c = H.load_config("sample,fast")
    H.apply_overrides(c, {key: bad})
    with pytest.raises(errors.ConfigError, match=f"config.{key}"):
      configuration.validate(c, check_tokenizer=False)
  exact = H.load_config("sample")
  exact.bank.num_views = 0  # not read by the exact recipe
  configuration.validate(exact, check_tokenizer=False)


def test_resume_check_reads_keys_added_later_as_their_old_value():
  """A workdir's config.json written before bank.scanner_augment existed resumes with it off
  (the only value it could have had) and is refused with it on, naming the key."""
  from gms_jax import configuration, errors

  config = H.load_config("sample,fast")
  saved = configuration.to_plain(config)
  del saved["bank"]["scanner_augment"], saved["bank"]["intensity_augment"]
  configuration.check_resume(saved, config, "w")
  for key in ("scanner_augment", "intensity_augment"):
    c = H.load_config("sample,fast")
    c.bank[key] = True
    with pytest.raises(errors.ConfigError, match=f"bank.{key}: false -> true"):
      configuration.check_resume(saved, c, "w")
  # a key that is neither saved nor added later still counts as a difference
  saved["bank"]["scanner_augment"] = False
  del saved["bank"]["num_views"]
  with pytest.raises(errors.ConfigError, match="bank.num_views: \"<unset>\" -> "):
    configuration.check_resume(saved, config, "w")


def test_bank_extras_follow_the_config_switches():
  """bank.<name>_augment switches map to the view extras the bank is built with (none by
  default: the fast recipe's views are docs/METHOD.md §3 unless asked)."""
  from gms_jax import recipes

  config = H.load_config("sample,fast")
  assert recipes.bank_extras(config) == ()
  config.bank.scanner_augment = True
  assert recipes.bank_extras(config) == ("scanner",)
  config.bank.intensity_augment = True
  assert recipes.bank_extras(config) == ("intensity", "scanner")
