"""Evaluation: ``gms-jax evaluate`` — the exact GMS protocol (SPEC §4) plus HD95 and native-size metrics.

Per image, at the model resolution S (224 by default): mapper "out" head -> decode -> threshold
``> 0.5``; ground truth = the mask nearest-resized to S, threshold ``>= 0.5``; DSC, IoU (0 when the
denominator is 0) and HD95 (see :mod:`gms_jax.metrics`). The extra ``*_native`` columns compare the
probability map resized (bilinear) to the image's native size and thresholded against the native
mask. Outputs (written to a fresh temp folder beside ``<out>``, then renamed into place; an
existing ``<out>`` is replaced only when it is an earlier ``gms-jax evaluate`` output holding
nothing else (see :mod:`gms_jax.outputs`), any other non-empty folder is refused):

    <out>/metrics.csv      one row per image
    <out>/summary.json     mean and sample std (ddof=1) of every metric, checkpoint step, dataset
    <out>/masks/<name>.png predicted S x S masks, 0/255 (docs/METHOD.md §4); label maps of
                           class ids for C > 2 classes
    <out>/overlays/<name>.png  image with ground-truth (green) and predicted (red) contours;
                           C > 2: prediction filled and ground-truth contours in class colours
    <out>/overlays_montage.png the first ``--montage`` overlays in one grid (for reports)

C > 2 classes (docs/METHOD.md §7): per class ``dsc_<name>`` / ``iou_<name>`` / ``hd95_<name>``
(empty = the class is absent from both prediction and truth: "absent", skipped by means), their
mean over the classes present (``dsc``...), the foreground-merged ``dsc_fg`` / ``iou_fg``, and
``type_true`` / ``type_pred``; ``summary.json`` adds ``lesion_type`` (accuracy and confusion
matrix over the images whose truth holds one foreground class).

``--tta flip|d4`` (off by default; not part of METHOD §4) averages the probability maps of the
image's left-right flip, or of all 8 flips/90° rotations, mapped back (:func:`gms_jax.inference.tta_probs`),
before the threshold; its default output folder is ``<dataset>-<split>-tta-<views>``.

The checkpoint is the best on the *validation* split by default (selected during training); the
test split is only ever evaluated, never used for selection.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time

import numpy as np

from gms_jax import inference, metrics, outputs
from gms_jax.data.checks import DataError
from gms_jax.predict import Segmenter, resize_probs


def contour(mask: np.ndarray) -> np.ndarray:
  from scipy import ndimage

  m = np.asarray(mask, bool)
  return m & ~ndimage.binary_erosion(m, border_value=0)


def overlay(image01: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """uint8 RGB picture: the image, ground-truth contour in green, prediction contour in red."""
  from scipy import ndimage

  img = (np.clip(image01, 0, 1) * 255).astype(np.uint8).copy()
  thick = lambda c: ndimage.binary_dilation(c, iterations=1)  # noqa: E731  (2-px lines read better)
  img[thick(contour(gt))] = (0, 255, 0)
  img[thick(contour(pred))] = (255, 0, 0)
  return img


def overlay_classes(image01: np.ndarray, gt: np.ndarray, pred: np.ndarray, num_classes: int):
  """uint8 RGB picture for label maps: the prediction filled in its class colour (40 %), the
  ground truth as 2-px contours in its class colour (:func:`gms_jax.classes.class_colours`)."""
  from scipy import ndimage

  from gms_jax.classes import class_colours

  colours = class_colours(num_classes).astype(np.float32)
  img = np.clip(image01, 0, 1).astype(np.float32) * 255.0
  fg = pred > 0
  img[fg] = 0.6 * img[fg] + 0.4 * colours[pred[fg]]
  img = img.astype(np.uint8)
  for c in range(1, num_classes):
    line = ndimage.binary_dilation(contour(gt == c), iterations=1)
    img[line] = colours[c].astype(np.uint8)
  return img


def _summary_classes(rows: list[dict], names) -> dict:
  """Per class, over the classes present, and foreground-merged; the lesion-type confusion
  matrix over images whose ground truth holds exactly one foreground class."""
  keys = []
  for suffix in ("", "_native"):
    for m in ("dsc", "iou", "hd95"):
      keys += [f"{m}_{n}{suffix}" for n in names[1:]] + [f"{m}{suffix}"]
    keys += [f"dsc_fg{suffix}", f"iou_fg{suffix}"]
  summary = metrics.summarize_nan(rows, keys)
  typed = [r for r in rows if r["type_true"]]
  if typed:
    index = {n: c for c, n in enumerate(names)}
    conf = metrics.type_confusion(
      [index[r["type_true"]] for r in typed],
      [index.get(r["type_pred"], 0) for r in typed],
      len(names),
    )
    summary["lesion_type"] = {
      "n": len(typed),
      "accuracy": float(np.trace(conf[1:, 1:]) / len(typed)),
      "rows_true": list(names[1:]),
      "columns_predicted": ["none", *names[1:]],
      "confusion": conf[1:, :].tolist(),
      "rule": "predicted type = the foreground class with most predicted pixels (none: no "
      "foreground predicted); images whose ground truth holds one foreground class",
    }
  summary["classes"] = list(names)
  return summary


def montage(tiles: list[np.ndarray], columns: int = 4, pad: int = 2) -> np.ndarray:
  """Equal-sized HxWx3 uint8 tiles in a grid (row-major), white gaps of ``pad`` pixels."""
  if not tiles:
    raise ValueError("montage of no images")
  h, w = tiles[0].shape[:2]
  cols = min(columns, len(tiles))
  rows = -(-len(tiles) // cols)
  grid = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3), 255, np.uint8)
  for i, t in enumerate(tiles):
    r, c = divmod(i, cols)
    grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = t
  return grid


def evaluate(
  seg: Segmenter,
  examples,
  out_dir: str,
  *,
  max_overlays: int = 64,
  meta: dict | None = None,
  montage_n: int = 0,
) -> dict:
  """Runs the protocol over ``examples`` (dicts from ``pipeline.eval_examples``); returns the summary."""
  out_dir = os.path.abspath(out_dir)
  outputs.check_owned(out_dir, "evaluate")  # before any work: refuse a folder that is not ours
  tmp = outputs.make_staging_dir(out_dir)
  try:
    return _evaluate(
      seg, examples, out_dir, tmp, max_overlays=max_overlays, meta=meta, montage_n=montage_n
    )
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # our staging folder (gone after a successful publish)


def _evaluate(seg, examples, out_dir, tmp, *, max_overlays, meta, montage_n) -> dict:
  from PIL import Image

  from gms_jax.predict import save_mask_png

  for sub in ("masks", "overlays"):
    os.makedirs(os.path.join(tmp, sub))
    outputs.apply_umask(os.path.join(tmp, sub), directory=True)
  rows = []
  tiles = []  # the first montage_n overlays, for overlays_montage.png
  t0 = time.perf_counter()

  from gms_jax.classes import Classes

  classes = getattr(seg, "classes", None) or Classes(2)  # any object with predict_probs: binary
  names = classes.class_names()

  def flush(buf):
    probs = seg.predict_probs(np.stack([e["image"] for e in buf]))
    for ex, p in zip(buf, probs):
      row = {"name": ex["name"]}
      if classes.binary:
        pred = p > inference.THRESHOLD
        gt = np.asarray(ex["mask"]) >= 0.5
        row.update(metrics.per_image(pred, gt))
        native_gt = np.asarray(ex["native_mask"]) > 0
        native_pred = resize_probs(p, native_gt.shape) > inference.THRESHOLD
        nat = metrics.per_image(native_pred, native_gt)
      else:  # label maps: per class, their mean over the classes present, merged foreground
        pred = classes.labels(p)
        gt = np.rint(np.asarray(ex["mask"])).astype(np.uint8)
        row.update(metrics.per_image_classes(pred, gt, names))
        native_gt = np.asarray(ex["native_mask"])
        native_pred = classes.labels(resize_probs(p, native_gt.shape))
        nat = metrics.per_image_classes(native_pred, native_gt, names)
        present = [c for c in range(1, classes.num_classes) if (native_gt == c).any()]
        row["type_true"] = names[present[0]] if len(present) == 1 else ""
        t = metrics.lesion_type(native_pred, classes.num_classes)  # both at the native size
        row["type_pred"] = names[t] if t else ""
      row.update({f"{k}_native": v for k, v in nat.items()})
      row["native_h"], row["native_w"] = native_gt.shape
      rows.append(row)
      save_mask_png(
        os.path.join(tmp, "masks", f"{ex['name']}.png"), pred, labels=not classes.binary
      )
      if len(rows) <= max(max_overlays, montage_n):
        ov = (
          overlay(ex["image"], gt, pred)
          if classes.binary
          else overlay_classes(ex["image"], gt, pred, classes.num_classes)
        )
        if len(rows) <= max_overlays:
          Image.fromarray(ov).save(os.path.join(tmp, "overlays", f"{ex['name']}.png"))
        if len(rows) <= montage_n:
          tiles.append(ov)

  buf = []
  for ex in examples:
    buf.append(ex)
    if len(buf) == seg.batch_size:
      flush(buf)
      buf = []
  if buf:
    flush(buf)
  if not rows:
    raise DataError("the evaluation split is empty")

  with open(os.path.join(tmp, "metrics.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(
      {k: "absent" if isinstance(v, float) and np.isnan(v) else v for k, v in r.items()}
      for r in rows
    )
  if tiles:
    Image.fromarray(montage(tiles)).save(os.path.join(tmp, "overlays_montage.png"))
  keys = ["dsc", "iou", "hd95", "dsc_native", "iou_native", "hd95_native"]
  if classes.binary:
    summary = metrics.summarize(rows, keys)
  else:
    summary = _summary_classes(rows, names)
  summary.update(meta or {})
  summary["checkpoint_step"] = seg.step
  summary["seconds"] = round(time.perf_counter() - t0, 2)
  with open(os.path.join(tmp, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  written = [
    os.path.relpath(os.path.join(r, n), tmp) for r, _, names in os.walk(tmp) for n in names
  ]
  outputs.write_manifest(tmp, "evaluate", written)
  outputs.publish(tmp, out_dir, "evaluate")
  return summary


def data_config(config, dataset: str | None, root: str | None, split_file: str | None):
  """The training config's data section, optionally pointed at another dataset (cross-domain)."""
  import copy

  data = copy.deepcopy(config.data)
  with data.unlocked():
    if dataset and dataset != data.name:
      data.name = dataset
      data.root = root or ""
      data.split_file = split_file or ""
    elif root:
      data.root = root
    if split_file is not None and not dataset:
      data.split_file = split_file
  return data
