"""Per-image DSC of two evaluate outputs of the same images, paired (e.g. single pass vs --tta).

python docs/analysis/paired_dsc.py runs/busi_fast150/eval/busi-test runs/busi_fast150/eval/busi-test-tta-flip
"""

import csv
import os
import sys

import numpy as np
from scipy import stats


def dsc(ev):
  return {r["name"]: float(r["dsc"]) for r in csv.DictReader(open(os.path.join(ev, "metrics.csv")))}


a, b = dsc(sys.argv[1]), dsc(sys.argv[2])
d = np.array([b[k] - a[k] for k in a])
v = np.array(list(b.values()))
print(
  f"B: mean {v.mean():.4f} median {np.median(v):.3f} <0.1 {(v < 0.1).sum()} >=0.75 {(v >= 0.75).mean():.3f}"
)
print(
  f"B - A: {d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f} (standard error), better {(d > 0).sum()}, "
  f"worse {(d < 0).sum()}, Wilcoxon p = {stats.wilcoxon(d).pvalue:.3f}"
)
