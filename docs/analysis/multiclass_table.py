"""Markdown tables of multi-class evaluate outputs (summary.json + metrics.csv), and the merged
foreground DSC of a multi-class model against a binary model on the same images, paired.

python docs/analysis/multiclass_table.py MULTI_EVAL [BINARY_EVAL]
"""

import csv
import json
import os
import sys

import numpy as np
from scipy import stats


def rows(ev):
  with open(os.path.join(ev, "metrics.csv")) as f:
    return {r["name"]: r for r in csv.DictReader(f)}


def cell(s, k):
  v = s[k]
  return "absent" if v["mean"] is None else f"{v['mean']:.4f} ± {v['std']:.4f} (n {v['n']})"


multi = sys.argv[1]
s = json.load(open(os.path.join(multi, "summary.json")))
names = s["classes"][1:]
print(f"{multi}: n={s['n']}, checkpoint step {s['checkpoint_step']}")
print("| metric | " + " | ".join(names) + " | mean over classes present | merged foreground |")
print("|---|" + "---|" * (len(names) + 2))
for m in ("dsc", "iou", "hd95"):
  merged = cell(s, f"{m}_fg") if f"{m}_fg" in s else "–"
  print(
    f"| {m.upper()} | "
    + " | ".join(cell(s, f"{m}_{n}") for n in names)
    + f" | {cell(s, m)} | {merged} |"
  )
lt = s.get("lesion_type")
if lt:
  print(f"\nlesion type: accuracy {lt['accuracy']:.4f} over {lt['n']} images")
  print("| true \\ predicted | " + " | ".join(lt["columns_predicted"]) + " |")
  print("|---|" + "---|" * len(lt["columns_predicted"]))
  for name, row in zip(lt["rows_true"], lt["confusion"]):
    print(f"| {name} | " + " | ".join(str(v) for v in row) + " |")

if len(sys.argv) > 2:
  a, b = rows(multi), rows(sys.argv[2])
  keys = sorted(set(a) & set(b))
  fg = np.array([float(a[k]["dsc_fg"]) for k in keys])
  bi = np.array([float(b[k]["dsc"]) for k in keys])
  d = fg - bi
  print(
    f"\nmerged foreground DSC {fg.mean():.4f} vs binary DSC {bi.mean():.4f} on {len(keys)} images: "
    f"difference {d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f} (standard error), "
    f"Wilcoxon p = {stats.wilcoxon(d).pvalue:.3f}"
  )
