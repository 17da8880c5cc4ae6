"""The step builder (gms_jax.step) and ``gms-jax compile`` (gms_jax.aot).

* On 8 fake CPU devices the compiled data-parallel train step moves no activations between
  devices: its optimized HLO holds all-reduces (gradients, metrics) and no all-gather, all-to-all
  or collective-permute; inference holds no collective at all. (Concatenating images and masks,
  or the heads, along the sharded batch axis made XLA reshuffle rows across devices.)
* ``"auto"`` loss settings follow the mesh's platform, not the host's.
* With libtpu installed (``pip install -e .[tpu]``), the smoke config compiles for a TPU v4-8 from
  this CPU host through ``gms-jax compile``, with the same collective check; skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import _train_helpers as H
import jax
import numpy as np
import pytest
from conftest import run_cli

from gms_jax import aot, parallel, tokenizers
from gms_jax import step as step_lib

REPO = Path(__file__).resolve().parents[1]
MOVES_ACTIVATIONS = (
  "all-gather",
  "all-to-all",
  "collective-permute",
  "reduce-scatter",
  "collective-broadcast",
  "ragged-all-to-all",
)
SMOKE = f"{REPO / 'configs' / 'gms.py'}:smoke"
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _only_all_reduce(counts: dict[str, int]) -> None:
  moved = {k: counts[k] for k in MOVES_ACTIVATIONS if counts.get(k)}
  assert not moved, f"the data-parallel program moves activations between devices: {counts}"


def test_collective_counts_reads_optimized_hlo():
  hlo = "\n".join(
    [
      "  %all-reduce.1 = (f32[16]{0}, /*index=1*/f32[]) all-reduce(f32[16]{0} %a, f32[] %b), "
      "channel_id=1, metadata={op_name=\"all-to-all(x)\"}",
      "  %ag = f32[8,4]{1,0} all-gather-start(f32[1,4]{1,0} %p), dimensions={0}",
      "  %agd = f32[8,4]{1,0} all-gather-done(f32[8,4]{1,0} %ag)",
      "  ROOT %cp = f32[2]{0} collective-permute(f32[2]{0} %q), source_target_pairs={{0,1}}",
      "  %x = f32[2]{0} add(f32[2]{0} %all-reduce.1, f32[2]{0} %y)",
    ]
  )
  counts = step_lib.collective_counts(hlo)
  assert (
    counts["all-reduce"],
    counts["all-gather"],
    counts["collective-permute"],
    counts["all-to-all"],
  ) == (1, 1, 1, 0)


def test_data_parallel_step_on_8_devices_only_all_reduces(tmp_path):
  """Batched encode/decode forced on (what "auto" picks on GPU/TPU), 8 fake CPU devices."""
  spec = {
    "workdir": str(tmp_path / "w"),
    "tfds_dir": str(tmp_path / "tfds"),
    "compile_only": True,
    "devices": [8],
    "out": str(tmp_path / "facts.json"),
    "overrides": {"loss.batch_decode": "true", "loss.batch_encode": "true"},
  }
  rc, out = H.run(spec, tmp_path / "spec.json", env=H.subprocess_env(n_devices=8), timeout=600)
  assert rc == 0, out[-6000:]
  facts = json.loads(Path(spec["out"]).read_text())
  assert facts["devices"] == 8 and facts["platform"] == "cpu"
  assert facts["loss"] == {"batch_decode": True, "batch_encode": True}
  assert facts["train"]["all-reduce"] >= 1  # gradients and metrics are summed over devices
  _only_all_reduce(facts["train"])
  assert not any(facts["predict"].values()), facts["predict"]


def _stub_mesh(platform: str):
  return types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)]))


def test_auto_settings_follow_the_mesh_platform():
  assert [step_lib.mesh_platform(_stub_mesh(p)) for p in ("cpu", "tpu", "cuda", "gpu", "rocm")] == [
    "cpu",
    "tpu",
    "gpu",
    "gpu",
    "gpu",
  ]
  config = H.load_config("smoke")
  assert config.loss.batch_decode == "auto" and config.loss.batch_encode == "auto"
  mesh = parallel.make_mesh(jax.devices("cpu")[:1])
  tok = tokenizers.abstract("taef2")
  on_cpu = step_lib.build(config, mesh, tokenizer=tok)
  assert on_cpu.platform == "cpu"
  assert not on_cpu.loss_kw["batch_decode"] and not on_cpu.loss_kw["batch_encode"]
  for target in ("tpu", "gpu"):  # a target's per-device program lowered on this host
    built = step_lib.build(config, mesh, tokenizer=tok, platform=target)
    assert built.loss_kw["batch_decode"] and built.loss_kw["batch_encode"]


def test_abstract_tokenizer_has_the_real_shapes_and_traces():
  from gms_jax.models.sd_vae import AutoencoderKLConfig

  real = H.tiny_tokenizer()
  abstract = tokenizers.abstract("sd-vae", AutoencoderKLConfig.tiny())
  shape = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t.params)  # noqa: E731
  assert shape(abstract) == shape(real)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.params))
  lat = jax.eval_shape(
    abstract.encode, tokenizers.shapes(abstract), jax.ShapeDtypeStruct((2, 16, 16, 3), np.float32)
  )
  assert lat.z.shape == (2, 8, 8, 4)  # the tiny VAE downsamples by 2


def test_per_device_batch_and_lr_rule():
  c = H.load_config("busi")
  assert step_lib.global_batch_size(c, 64) == 8  # per_device_batch_size 0: the global batch
  c.per_device_batch_size = 8
  assert step_lib.global_batch_size(c, 64) == 512
  assert step_lib.learning_rate(c, 512) == c.optimizer.learning_rate  # "none": as given
  c.optimizer.lr_scaling = "sqrt"
  assert step_lib.learning_rate(c, 512) == pytest.approx(2e-3 * 8)  # sqrt(512 / 8)
  c.optimizer.lr_scaling = "linear"
  assert step_lib.learning_rate(c, 32) == pytest.approx(2e-3 * 4)
  accel = H.load_config("busi,accel")  # 8 per chip, bf16, sqrt rule: a v4-8 (4 chips) runs 32
  assert accel.precision == "bfloat16" and step_lib.global_batch_size(accel, 4) == 32
  assert step_lib.learning_rate(accel, 32) == pytest.approx(2e-3 * 2)
  c.optimizer.lr_scaling = "cubic"
  with pytest.raises(ValueError, match="lr_scaling"):
    step_lib.learning_rate(c, 32)


def _cli(*args, timeout=900):
  return run_cli("compile", *args, timeout=timeout)


def test_compile_cli_usage_errors_are_one_line():
  for args in (
    ["--config", SMOKE],
    ["--config", SMOKE, "--target", "v99-8"],
    ["--config", SMOKE, "--target", "v4-8", "--bogus=1"],
  ):
    p = _cli(*args, timeout=120)
    assert p.returncode == 2, (args, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
  assert "v99-8" in _cli("--config", SMOKE, "--target", "v99-8").stderr


def test_compile_json_never_replaces_a_foreign_file(tmp_path):
  mine = tmp_path / "notes.json"
  mine.write_text('{"my": "notes"}')
  p = _cli("--config", SMOKE, "--target", "v4-8", "--json", str(mine), timeout=120)
  assert p.returncode == 2 and "refusing to replace" in p.stderr, p.stderr
  assert mine.read_text() == '{"my": "notes"}'


@pytest.mark.skipif(HAS_LIBTPU, reason="checks the message shown when libtpu is missing")
def test_compile_for_tpu_without_libtpu_says_what_to_install():
  p = _cli("--config", SMOKE, "--target", "v4-8", timeout=120)
  assert p.returncode == 1 and "pip install -e .[tpu]" in p.stderr, p.stderr
  assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e .[tpu])")
def test_compile_smoke_for_tpu_v4_8(tmp_path):
  """The smoke config's step and inference, compiled by libtpu for a v4-8 (4 megacore chips)."""
  out = tmp_path / "v4-8.json"
  p = _cli("--config", SMOKE, "--target", "v4-8", "--json", str(out))
  assert p.returncode == 0, p.stderr[-4000:]
  assert "collectives (optimized HLO)" in p.stdout and "estimates" in p.stdout
  rec = json.loads(out.read_text())
  assert (rec["target"], rec["devices"], rec["platform"]) == ("v4-8", 4, "tpu")
  assert rec["device_kind"].startswith("TPU v4")
  assert rec["global_batch"] == 8 and rec["per_device_batch"] == 2
  assert rec["loss"]["batch_decode"] and rec["loss"]["batch_encode"]  # "auto" on a TPU target
  chip = aot.CHIPS["v4"]
  for name, images in (("train", 8), ("inference", 64 * 4)):
    r = rec[name]
    mem = r["memory_bytes"]
    assert mem["argument"] > 0 and mem["peak"] >= mem["argument"] and r["fits"] is True
    assert r["hbm_bytes"] == chip.hbm_bytes
    assert r["flops_per_device"] > 0 and r["bytes_accessed_per_device"] > 0 and r["compile_s"] > 0
    roofline = max(
      r["flops_per_device"] / chip.peak_flops["float32"],
      r["bytes_accessed_per_device"] / chip.hbm_bytes_per_s,
    )
    assert r["roofline_s"] == pytest.approx(roofline)
    assert r["images_per_s"] == pytest.approx(images / roofline)
    assert 0 < r["mfu_bound"] <= 1
    _only_all_reduce(r["collectives"])
  assert rec["train"]["collectives"]["all-reduce"] >= 1
  assert not any(rec["inference"]["collectives"].values())
  # The mapper's params, Adam's two moments and the tokenizer are replicated on every chip.
  assert rec["train"]["memory_bytes"]["argument"] > 3 * 4 * 1_000_000


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e .[tpu])")
def test_compile_fast_smoke_for_tpu_v4_8_compiles_what_train_runs(tmp_path):
  """A fast config compiles its banked steps and the bank encoder, not the exact step; the
  record carries the recipe, global batch, peak LR (per_device_batch_size and lr_scaling, as in
  training) and the schedule's size; phase 1 has no decoder (~1/10 of phase 2's FLOPs)."""
  out = tmp_path / "fast.json"
  p = _cli(
    "--config",
    "smoke,fast",
    "--target",
    "v4-8",
    "--json",
    str(out),
    "--config.per_device_batch_size=4",
    "--config.optimizer.lr_scaling=linear",
    "--config.fast.dice_steps=7",
    "--train-examples",
    "29",
  )
  assert p.returncode == 0, p.stderr[-4000:]
  assert "step phase1" in p.stdout and "bank encode" in p.stdout
  rec = json.loads(out.read_text())
  assert rec["recipe"] == "fast" and rec["global_batch"] == 16 and rec["per_device_batch"] == 4
  assert rec["peak_lr"] == pytest.approx(2e-3 * 16 / 8)
  assert set(rec["steps"]) == {"phase1", "phase2"} and rec["train"]["step"] == "phase1"
  # 29 examples / 16 = 1 step per epoch; the smoke config's 10 epochs, then 7 phase-2 steps
  assert rec["schedule"]["steps"] == {"phase1": 10, "phase2": 7}
  assert rec["schedule"]["bank_views"] == 29 * 4
  p1, p2, enc = rec["steps"]["phase1"], rec["steps"]["phase2"], rec["bank_encode"]
  assert 0 < p1["flops_per_device"] < 0.2 * p2["flops_per_device"]
  assert enc["flops_per_device"] > 0 and enc["per_device_batch"] == 8
  for r in (p1, p2):
    assert r["collectives"]["all-reduce"] >= 1
    _only_all_reduce(r["collectives"])
  assert not any(enc["collectives"].values())


def test_cpu_library_fusion_reaches_the_compiled_step_and_keeps_its_values():
  """config.cpu_library_fusion: the built train step is compiled with XLA's YNNPACK fusions for
  those ops instead of XLA's default set (another count of library fusions in the optimized HLO;
  jaxlib 0.10.2's default already fuses some ops, differently), one step from
  the same state and batch gives the same loss and parameters (float32 rounding), another
  platform gets no CPU options, and an unknown name is refused with one line."""
  config = H.load_config("smoke")
  mesh = parallel.make_mesh(jax.devices("cpu")[:1])
  tok = H.tiny_tokenizer()
  rng = np.random.default_rng(0)
  results = {}
  for fusion in ("", "dot,reduce"):
    config.cpu_library_fusion = fusion
    built = step_lib.build(config, mesh, tokenizer=tok)
    s = built.image_size
    batch = {
      "image": rng.random((built.global_batch_size, s, s, 3), np.float32),
      "mask": (rng.random((built.global_batch_size, s, s)) > 0.5).astype(np.float32),
    }
    rng = np.random.default_rng(0)  # the same batch for both settings
    compiled = built.lower_train().compile()
    state, metrics = compiled(built.init(), tok.params, batch)
    results[fusion] = (
      compiled.as_text().count('"__ynn_fusion"'),
      float(metrics["loss"]),
      jax.tree.map(np.asarray, state["params"]),
    )
  (n_default, loss_default, p_default), (n_fused, loss_fused, p_fused) = results.values()
  assert n_fused != n_default, (n_default, n_fused)
  np.testing.assert_allclose(loss_fused, loss_default, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), p_fused, p_default)
  assert step_lib.cpu_compiler_options("dot,reduce", "tpu") is None
  assert step_lib.cpu_compiler_options("", "cpu") is None
  with pytest.raises(ValueError, match="'conv'") as e:
    step_lib.cpu_compiler_options("dot,conv", "cpu")
  assert "\n" not in str(e.value)
  from gms_jax import configuration, errors

  config.cpu_library_fusion = "dot,conv"
  with pytest.raises(errors.ConfigError, match="cpu_library_fusion"):
    configuration.validate(config, check_tokenizer=False)
