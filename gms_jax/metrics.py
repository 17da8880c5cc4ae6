"""Segmentation metrics: the exact GMS protocol (docs/METHOD.md §4) plus HD95.

All functions take binary masks as numpy arrays (bool or {0,1}); batched ones take (N, H, W).

- DSC = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN); each is 0 when its denominator is 0
  (METHOD §4: so an image whose ground truth and prediction are both empty scores 0, as in the
  original code).
- HD95 = 95th percentile of the symmetric surface distances (the MedPy ``hd95`` definition: surface
  = mask minus its 4-connected erosion; distances from every surface pixel of one mask to the
  nearest surface pixel of the other, both directions pooled), computed with scipy's exact
  Euclidean distance transform, in pixels (times ``spacing``).
  Empty masks: both empty -> 0; exactly one empty -> the image diagonal (the largest distance
  possible in the image, a worst-case penalty instead of MedPy's error or MONAI's NaN, so a model
  that predicts nothing is not flattered by a NaN dropped from the mean).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage


def _as_bool(x) -> np.ndarray:
  x = np.asarray(x)
  return x if x.dtype == bool else x > 0


def confusion(pred, gt) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-image (TP, FP, FN) over the trailing two axes."""
  p, g = _as_bool(pred), _as_bool(gt)
  if p.shape != g.shape:
    raise ValueError(f"prediction shape {p.shape} != ground truth shape {g.shape}")
  axes = (-2, -1)
  tp = np.sum(p & g, axis=axes, dtype=np.int64)
  fp = np.sum(p & ~g, axis=axes, dtype=np.int64)
  fn = np.sum(~p & g, axis=axes, dtype=np.int64)
  return tp, fp, fn


def _safe_div(num, den) -> np.ndarray:
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def dice_iou(pred, gt) -> tuple[np.ndarray, np.ndarray]:
  """Per-image DSC and IoU (zero-denominator rule: 0). Shapes (..., H, W) -> (...)."""
  tp, fp, fn = confusion(pred, gt)
  return _safe_div(2 * tp, 2 * tp + fp + fn), _safe_div(tp, tp + fp + fn)


def _surface(mask: np.ndarray) -> np.ndarray:
  # 4-connected erosion, border_value=0 so pixels on the image edge count as surface (MedPy's rule).
  eroded = ndimage.binary_erosion(
    mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0
  )
  return mask & ~eroded


def surface_distances(a, b, spacing: float | Sequence[float] = 1.0) -> np.ndarray:
  """Distances from each surface pixel of ``a`` to the nearest surface pixel of ``b``."""
  a, b = _as_bool(a), _as_bool(b)
  sa, sb = _surface(a), _surface(b)
  dt = ndimage.distance_transform_edt(~sb, sampling=spacing)
  return dt[sa]


def hd95(pred, gt, spacing: float | Sequence[float] = 1.0) -> float:
  """95th-percentile symmetric Hausdorff distance of one pair of 2-D masks (see module doc)."""
  p, g = _as_bool(pred), _as_bool(gt)
  if p.ndim != 2 or p.shape != g.shape:
    raise ValueError(f"hd95 takes two 2-D masks of one shape, got {p.shape} and {g.shape}")
  if not p.any() and not g.any():
    return 0.0
  if not p.any() or not g.any():
    sy, sx = (spacing, spacing) if np.isscalar(spacing) else spacing
    return float(math.hypot(p.shape[0] * sy, p.shape[1] * sx))
  d = np.concatenate([surface_distances(p, g, spacing), surface_distances(g, p, spacing)])
  return float(np.percentile(d, 95))


def per_image(pred, gt) -> dict[str, float]:
  """DSC, IoU and HD95 of one 2-D pair."""
  d, i = dice_iou(pred, gt)
  return {"dsc": float(d), "iou": float(i), "hd95": hd95(pred, gt)}


def summarize(rows: Iterable[Mapping[str, float]], keys: Sequence[str] | None = None) -> dict:
  """Mean and sample std (ddof=1) of each numeric column over the rows (docs/METHOD.md §4)."""
  rows = list(rows)
  if not rows:
    raise ValueError("no rows to summarize")
  keys = keys or [
    k
    for k, v in rows[0].items()
    if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)
  ]
  out = {"n": len(rows)}
  for k in keys:
    v = np.asarray([r[k] for r in rows], np.float64)
    out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
  return out


# ----------------------------------------------------------------------------- C > 2 classes
# A class absent from both the prediction and the ground truth of an image has no DSC, IoU or
# HD95: it is NaN ("absent"), never 0 or 1, and means skip it (numpy nanmean). The binary
# functions above keep METHOD §4's rule (both empty -> 0).


def class_dice_iou(pred_labels, gt_labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Label maps (..., H, W) -> per foreground class (..., K) DSC and IoU, NaN where the class is
  in neither map."""
  p, g = np.asarray(pred_labels), np.asarray(gt_labels)
  if p.shape != g.shape:
    raise ValueError(f"prediction shape {p.shape} != ground truth shape {g.shape}")
  dsc, iou = [], []
  for c in range(1, int(num_classes)):
    tp, fp, fn = confusion(p == c, g == c)
    present = (tp + fp + fn) > 0
    d, i = _safe_div(2 * tp, 2 * tp + fp + fn), _safe_div(tp, tp + fp + fn)
    dsc.append(np.where(present, d, np.nan))
    iou.append(np.where(present, i, np.nan))
  return np.stack(dsc, axis=-1), np.stack(iou, axis=-1)


def nanmean(x, axis=None):
  """Mean skipping NaN (absent classes); NaN when everything is absent (no warning)."""
  x = np.asarray(x, np.float64)
  n = np.sum(~np.isnan(x), axis=axis)
  s = np.nansum(x, axis=axis)
  return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def per_image_classes(pred_labels, gt_labels, names: Sequence[str]) -> dict[str, float]:
  """DSC, IoU and HD95 of each foreground class of one 2-D pair of label maps (keys
  ``dsc_<name>`` ...; NaN where absent from both), their means over the classes present
  (``dsc``, ``iou``, ``hd95``), and the foreground-merged ``dsc_fg`` / ``iou_fg`` (any class vs
  background)."""
  p, g = np.asarray(pred_labels), np.asarray(gt_labels)
  num_classes = len(names)
  d, i = class_dice_iou(p, g, num_classes)
  row: dict[str, float] = {}
  hds = []
  for c in range(1, num_classes):
    name = names[c]
    row[f"dsc_{name}"] = float(d[c - 1])
    row[f"iou_{name}"] = float(i[c - 1])
    h = hd95(p == c, g == c) if not np.isnan(d[c - 1]) else float("nan")
    row[f"hd95_{name}"] = h
    hds.append(h)
  row["dsc"] = float(nanmean(d))
  row["iou"] = float(nanmean(i))
  row["hd95"] = float(nanmean(hds))
  fd, fi = dice_iou(p > 0, g > 0)
  row["dsc_fg"], row["iou_fg"] = float(fd), float(fi)
  return row


def summarize_nan(rows: Iterable[Mapping[str, float]], keys: Sequence[str]) -> dict:
  """:func:`summarize` skipping NaN (absent classes): ``{"mean", "std", "n"}`` per key, ``n`` the
  images where the key is not absent (mean/std None when it is absent everywhere)."""
  rows = list(rows)
  out = {"n": len(rows)}
  for k in keys:
    v = np.asarray([r[k] for r in rows], np.float64)
    v = v[~np.isnan(v)]
    out[k] = {
      "mean": float(v.mean()) if len(v) else None,
      "std": float(v.std(ddof=1)) if len(v) > 1 else (0.0 if len(v) else None),
      "n": int(len(v)),
    }
  return out


def lesion_type(labels, num_classes: int) -> int:
  """The class of most pixels among the foreground classes of a label map (0: no foreground);
  ties go to the lower id."""
  counts = np.bincount(np.asarray(labels, np.int64).ravel(), minlength=int(num_classes))
  fg = counts[1 : int(num_classes)]
  return int(np.argmax(fg)) + 1 if fg.sum() > 0 else 0


def type_confusion(true_types, pred_types, num_classes: int) -> np.ndarray:
  """(C, C) counts: row = true type (1..C-1; 0 unused), column = predicted (0 = none)."""
  m = np.zeros((int(num_classes), int(num_classes)), np.int64)
  for t, p in zip(true_types, pred_types):
    m[int(t), int(p)] += 1
  return m
