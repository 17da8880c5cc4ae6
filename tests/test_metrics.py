"""Metrics against hand-computed cases and an independent brute-force HD95."""

import math

import numpy as np
import pytest

from gms_jax import metrics


def test_dice_iou_hand_computed():
  pred = np.array([[1, 1], [0, 0]], bool)
  gt = np.array([[1, 0], [1, 0]], bool)
  # TP=1, FP=1, FN=1.
  d, i = metrics.dice_iou(pred, gt)
  assert d == pytest.approx(2 / 4)
  assert i == pytest.approx(1 / 3)


def test_dice_iou_batched_and_zero_denominator():
  pred = np.zeros((3, 4, 4), bool)
  gt = np.zeros((3, 4, 4), bool)
  pred[1, :2] = True  # prediction only: DSC = IoU = 0
  gt[2, 1:3, 1:3] = True
  pred[2, 1:3, 1:3] = True  # perfect
  d, i = metrics.dice_iou(pred, gt)
  np.testing.assert_array_equal(d, [0.0, 0.0, 1.0])  # image 0: both empty -> 0 by docs/METHOD.md §4
  np.testing.assert_array_equal(i, [0.0, 0.0, 1.0])


def _brute_hd95(a, b):
  """Independent reference: explicit surfaces and all pairwise distances."""

  def surface(m):
    m = np.pad(m, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return np.argwhere(m[1:-1, 1:-1] & ~inner).astype(float)

  sa, sb = surface(a), surface(b)
  dist = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
  return np.percentile(np.concatenate([dist.min(1), dist.min(0)]), 95)


def _disk(n, r, cy, cx):
  yy, xx = np.mgrid[:n, :n]
  return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.mark.parametrize("d", [2, 5, 9])
def test_hd95_concentric_disks_known_distance(d):
  gt = _disk(96, 20, 48, 48)
  pred = _disk(96, 20 + d, 48, 48)
  h = metrics.hd95(pred, gt)
  assert abs(h - d) <= 1.0, h  # geometry: the rings are d apart
  assert h == pytest.approx(_brute_hd95(pred, gt))  # exact against brute force


def test_hd95_shifted_square_matches_brute_force():
  a = np.zeros((40, 50), bool)
  b = np.zeros((40, 50), bool)
  a[5:20, 5:25] = True
  b[12:30, 15:40] = True
  assert metrics.hd95(a, b) == pytest.approx(_brute_hd95(a, b))


def test_hd95_empty_rules_and_identity():
  z = np.zeros((30, 40), bool)
  m = z.copy()
  m[3:9, 4:12] = True
  assert metrics.hd95(z, z) == 0.0
  assert metrics.hd95(m, z) == pytest.approx(math.hypot(30, 40))
  assert metrics.hd95(z, m) == pytest.approx(50.0)
  assert metrics.hd95(m, m) == 0.0
  r = metrics.per_image(m, m)
  assert r == {"dsc": 1.0, "iou": 1.0, "hd95": 0.0}


def test_summarize_sample_std():
  rows = [{"dsc": 0.5, "iou": 0.2}, {"dsc": 1.0, "iou": 0.4}, {"dsc": 0.0, "iou": 0.0}]
  s = metrics.summarize(rows)
  assert s["n"] == 3
  assert s["dsc"]["mean"] == pytest.approx(0.5)
  assert s["dsc"]["std"] == pytest.approx(np.std([0.5, 1.0, 0.0], ddof=1))
  assert s["iou"]["std"] == pytest.approx(0.2)
