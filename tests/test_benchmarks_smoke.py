"""Keeps ``benchmarks/`` working: each script runs once with ``--quick`` (tiny SD config, 32², one
repeat; the numbers are meaningless) in a subprocess, and the JSON it writes has the fields that
``benchmarks/RESULTS.md`` is built from.  These are not timing tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # a loaded 2-core CI machine; a quiet one needs well under a minute per script


def _run(script: str, out: Path, *extra: str) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
    [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--out", str(out), *extra],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
    check=False,
  )
  assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  assert "|" in proc.stdout  # printed a table
  return json.loads(out.read_text())


def _check_machine(payload: dict, name: str):
  assert payload["benchmark"] == name
  m = payload["machine"]
  for key in ("commit", "cpu", "cpu_count", "versions", "command", "date"):
    assert key in m
  assert payload["table_markdown"].startswith("| ")


def test_train_step_quick(tmp_path):
  d = _run("train_step.py", tmp_path / "train_step.json", "--rounds", "2")
  _check_machine(d, "train_step")
  recs = d["records"]
  assert {(r["framework"], r["tokenizer"], r["variant"]) for r in recs} == {
    ("jax", "sd-vae", "no-remat"),
    ("torch", "sd-vae", "no-remat"),
  }
  for r in recs:
    assert "error" not in r, r.get("error")
    for key in (
      "median_s",
      "min_s",
      "max_s",
      "iqr_s",
      "times_s",
      "images_per_s",
      "step_peak_rss_bytes",
      "ru_maxrss_bytes",
      "check_loss",
      "last_loss",
    ):
      assert key in r, key
    assert r["median_s"] > 0 and r["step_peak_rss_bytes"] > 0
    # two rounds of one repeat each, pooled
    assert r["rounds"] == 2 and len(r["times_s"]) == 2 and len(r["round_medians_s"]) == 2
    assert r["median_s"] == pytest.approx(sum(r["round_medians_s"]) / 2)
  jax_rec = next(r for r in recs if r["framework"] == "jax")
  assert jax_rec["compile_s"] > 0 and jax_rec["flops"] > 0 and jax_rec["speedup_vs_torch"] > 0
  assert jax_rec["impl"].startswith("gms_jax.step.build")
  # Same weights, same batch, no noise: the two frameworks compute the same loss.
  assert jax_rec["check_loss_rel_diff"] < 1e-4


def test_inference_quick(tmp_path):
  d = _run("inference.py", tmp_path / "inference.json")
  _check_machine(d, "inference")
  recs = d["records"]
  assert {(r["framework"], r["tokenizer"]) for r in recs} == {
    ("jax", "sd-vae"),
    ("torch", "sd-vae"),
  }
  for r in recs:
    assert "error" not in r, r.get("error")
    assert r["best"]["images_per_s"] > 0 and r["batch1"]["batch"] == 1
    assert r["step_peak_rss_bytes"] > 0
  jax_rec = next(r for r in recs if r["framework"] == "jax")
  assert jax_rec["best"]["compile_s"] > 0 and jax_rec["speedup_batch1_vs_torch"] > 0
  # Same weights and images: both frameworks predict the same mask fraction.
  fr = {r["framework"]: r["batch1"]["mask_fraction"] for r in recs}
  assert abs(fr["jax"] - fr["torch"]) < 0.02


def test_pipeline_throughput_quick(tmp_path):
  d = _run("pipeline_throughput.py", tmp_path / "pipeline.json", "--workers", "0")
  _check_machine(d, "pipeline_throughput")
  (r,) = d["records"]
  assert r["workers"] == 0 and r["batch"] == 8 and r["images_per_s"] > 0


def test_fast_recipe_quick(tmp_path):
  d = _run("fast_recipe.py", tmp_path / "fast_recipe.json")
  _check_machine(d, "fast_recipe")
  recs = {r["what"].split(" (")[0]: r for r in d["records"]}
  assert set(recs) == {"encode", "banked phase 1", "banked phase 2", "exact"}
  assert recs["encode"]["per_view_s"] > 0 and recs["encode"]["flops"] > 0
  for k in ("banked phase 1", "banked phase 2", "exact"):
    assert recs[k]["median_s"] > 0 and recs[k]["flops"] > 0 and recs[k]["compile_s"] > 0
  # the banked steps leave out the encoder (phase 1 also the decoder): strictly less arithmetic
  assert recs["banked phase 1"]["flops"] < recs["banked phase 2"]["flops"] < recs["exact"]["flops"]


def test_cpu_fusion_quick(tmp_path):
  d = _run("cpu_fusion.py", tmp_path / "cpu_fusion.json")
  _check_machine(d, "cpu_fusion")
  got = {(r["what"].split(" (")[0], r["fusion"]) for r in d["records"]}
  assert got == {(w, f) for w in ("encode", "banked phase 1") for f in ("", "dot,reduce")}
  for r in d["records"]:
    assert r["median_s"] > 0 and r["max_abs_diff_vs_first"] < 1e-3
    assert (r["compiler_options"] is None) == (r["fusion"] == "")
