"""What an evaluate output's failures (DSC < 0.1) are: empty masks, masks off the lesion, lesion size.

    python docs/analysis/failures.py runs/busi_fast_int_k8_e90/eval/bus-bra-all /path/to/bus-bra

Ground truth and saved masks as in lcc_postprocess.py (the docs/METHOD.md §4 resize); lesion size =
true mask area over image area at the saved size.
"""

import csv
import os
import sys

from lcc_postprocess import pred_and_truth


def main(ev, root):
  rows = [r for r in csv.DictReader(open(os.path.join(ev, "metrics.csv"))) if float(r["dsc"]) < 0.1]
  empty = off = small = 0
  for r in rows:
    pred, gt = pred_and_truth(ev, root, r["name"])
    empty += not pred.any()
    off += not (pred & gt).any()
    small += gt.mean() < 0.05
  print(
    f"{ev}: {len(rows)} images with DSC < 0.1: {empty} empty, {off} with no overlap with the "
    f"lesion (empty included), {small} with a lesion < 5 % of the image"
  )


if __name__ == "__main__":
  main(*sys.argv[1:3])
