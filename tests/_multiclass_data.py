"""Synthetic multi-class datasets for the tests: every image holds several classes at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

LABELS = {"background": 0, "square": 1, "disc": 2}


def make_dataset(root: Path, n: int = 48, size: int = 64, seed: int = 0, labels=LABELS) -> Path:
  """``n`` images of ``size``² in the GMS layout with ``dataset.json`` labels: a bright square
  (class 1) and a dark disc (class 2) on a noisy mid-grey background, each at a random place and
  size (most images hold both; one in eight only one of them)."""
  rng = np.random.default_rng(seed)
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  yy, xx = np.mgrid[:size, :size]
  for i in range(n):
    img = 0.45 + 0.06 * rng.standard_normal((size, size))
    lab = np.zeros((size, size), np.uint8)
    which = i % 8
    if which != 7:  # the square
      s = rng.integers(size // 5, size // 3)
      y0, x0 = rng.integers(0, size // 2 - 2, size=2)
      lab[y0 : y0 + s, x0 : x0 + s] = 1
    if which != 6:  # the disc, in the other half
      r = rng.integers(size // 10, size // 6)
      cy, cx = rng.integers(size // 2 + r // 2, size - r, size=2)
      lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 2
    img[lab == 1] = 0.9 + 0.03 * rng.standard_normal(int((lab == 1).sum()))
    img[lab == 2] = 0.08 + 0.03 * rng.standard_normal(int((lab == 2).sum()))
    rgb = (np.clip(img, 0, 1)[..., None].repeat(3, -1) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "images" / f"case{i:03d}.png")
    Image.fromarray(lab, mode="L").save(root / "masks" / f"case{i:03d}.png")
  (root / "dataset.json").write_text(json.dumps({"name": "shapes", "labels": labels}, indent=2))
  return root
