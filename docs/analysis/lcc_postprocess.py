"""Largest-connected-component post-processing, measured offline on an evaluate output's saved masks.

    python docs/analysis/lcc_postprocess.py runs/busi_fast150/eval/busi-test /path/to/busi

Ground truth as in METHOD §4 (gms_jax.data.augment.resize_mask, >= 0.5); DSC by gms_jax.metrics.
"""

import csv
import os
import sys

import numpy as np
from PIL import Image
from scipy import ndimage

from gms_jax import metrics
from gms_jax.data.augment import resize_mask


def largest_component(pred):
  lab, n = ndimage.label(pred)
  if n <= 1:
    return pred
  return lab == 1 + int(np.argmax(ndimage.sum(pred, lab, range(1, n + 1))))


def pred_and_truth(ev, root, name):
  """The saved predicted mask of ``name`` and its ground truth (METHOD §4), both bool, that size."""
  pred = np.asarray(Image.open(os.path.join(ev, "masks", name + ".png"))) > 127
  m = np.asarray(Image.open(os.path.join(root, "masks", name + ".png")))
  m = m[..., 0] if m.ndim == 3 else m
  return pred, resize_mask(m.astype(np.float32) / 255.0, pred.shape[0]) >= 0.5


def main(ev, root):
  rows = list(csv.DictReader(open(os.path.join(ev, "metrics.csv"))))
  raw, lcc = [], []
  for r in rows:
    pred, gt = pred_and_truth(ev, root, r["name"])
    raw.append(float(metrics.dice_iou(pred, gt)[0]))
    lcc.append(float(metrics.dice_iou(largest_component(pred), gt)[0]))
  print(
    f"{ev}: n={len(rows)} max|raw - metrics.csv|={max(abs(a - float(r['dsc'])) for a, r in zip(raw, rows)):.2g}"
  )
  for name, v in (("as saved", np.array(raw)), ("largest component", np.array(lcc))):
    print(
      f"  {name:17s} DSC {v.mean():.4f} ± {v.std(ddof=1):.4f}  median {np.median(v):.3f}  < 0.1: {(v < 0.1).sum()}"
    )


if __name__ == "__main__":
  main(*sys.argv[1:3])
