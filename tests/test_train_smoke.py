"""`gms-jax train --config configs/gms.py:smoke` end to end: the shipped sample, packaged TAEF2.

Learning happens: the training loss falls and the validation Dice beats the trivial baseline
(predicting the whole image as foreground; predicting nothing scores 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import _train_helpers as H
import numpy as np
import pytest


def _baseline_dice(tfds_dir: str, image_size: int) -> float:
  from gms_jax import metrics
  from gms_jax.data import builder, pipeline

  val = builder.prepare({"name": "sample", "tfds_dir": tfds_dir})["validation"]
  gt = np.stack([e["mask"] for e in pipeline.eval_examples(val, image_size=image_size)]) >= 0.5
  return float(np.mean(metrics.dice_iou(np.ones_like(gt), gt)[0]))


@pytest.mark.slow
def test_smoke_config_learns(smoke_run):
  workdir, tfds, p = smoke_run
  assert p.returncode == 0, p.stderr[-6000:]

  config = json.loads((workdir / "config.json").read_text())
  assert config["tokenizer"]["name"] == "taef2" and config["data"]["name"] == "sample"
  records = H.read_jsonl(workdir / "metrics.jsonl")
  losses = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
  evals = [r for r in records if "eval/val_dice" in r]
  baseline = _baseline_dice(tfds, config["data"]["image_size"])
  print(
    f"\n[smoke] loss {losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f} "
    f"(step {losses[-1][0]}); validation Dice {[round(r['eval/val_dice'], 3) for r in evals]}"
    f" vs all-foreground baseline {baseline:.3f}"
  )
  assert losses[-1][0] == 30 and all(np.isfinite(v) for _, v in losses)
  assert losses[-1][1] < 0.7 * losses[0][1]
  assert evals[-1]["eval/val_dice"] > baseline + 0.1
  assert list(Path(workdir, "tensorboard").glob("events.out.tfevents.*"))
  from gms_jax import run_metadata

  mapper, cfg, step = run_metadata.restore_mapper(str(workdir), "best")
  assert step in (15, 30) and cfg.data.image_size == config["data"]["image_size"]
  assert mapper.cfg.in_channels == 32  # TAEF2 latents
