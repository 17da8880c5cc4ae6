"""Predicted mask area over ground-truth area, per image, from an evaluate output's saved masks.

    python docs/analysis/area_ratio.py runs/busi_fast150/eval/busi-test /path/to/busi

Ground truth as in METHOD §4 (gms_jax.data.augment.resize_mask, >= 0.5), at the saved masks' size.
A ratio above 1 is over-segmentation. Reported over images the model found (DSC >= 0.3), so the
outright failures do not dominate it.
"""

import csv
import os
import sys

import numpy as np
from lcc_postprocess import pred_and_truth  # same folder: python puts the script's folder first


def main(ev, root):
  rows = list(csv.DictReader(open(os.path.join(ev, "metrics.csv"))))
  ratio, dsc = [], []
  for r in rows:
    pred, gt = pred_and_truth(ev, root, r["name"])
    if gt.sum() == 0:
      continue
    ratio.append(pred.sum() / gt.sum())
    dsc.append(float(r["dsc"]))
  ratio, dsc = np.array(ratio), np.array(dsc)
  found = dsc >= 0.3
  q1, med, q3 = np.quantile(ratio[found], [0.25, 0.5, 0.75])
  print(
    f"{ev}: n={len(ratio)}, found (DSC >= 0.3) {found.sum()}: pred/gt area median {med:.3f} "
    f"(quartiles {q1:.3f}-{q3:.3f}), larger than gt on {(ratio[found] > 1).mean():.0%}"
  )


if __name__ == "__main__":
  main(*sys.argv[1:3])
