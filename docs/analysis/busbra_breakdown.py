"""BUSI -> BUS-BRA DSC by scanner, pathology and lesion-size quartile (bus_data.csv), per workdir.

    python docs/analysis/busbra_breakdown.py /path/to/bus-bra/bus_data.csv busi_fast150 busi_fast_k8

The first argument is BUS-BRA's ``bus_data.csv`` (docs/DATA.md); the rest are run names under runs/.
"""

import collections
import csv
import sys

import numpy as np

meta = {r["ID"]: r for r in csv.DictReader(open(sys.argv[1]))}
for run in sys.argv[2:]:
  rows = list(csv.DictReader(open(f"runs/{run}/eval/bus-bra-all/metrics.csv")))
  d = {r["name"]: float(r["dsc"]) for r in rows}
  print(run, "mean", np.mean(list(d.values())))
  for key in ("Device", "Pathology"):
    g = collections.defaultdict(list)
    for n, v in d.items():
      g[meta[n][key]].append(v)
    for k, v in sorted(g.items(), key=lambda kv: -len(kv[1])):
      v = np.array(v)
      print(
        f"  {key[:4]} {k[:28]:28s} n {len(v):4d} mean {v.mean():.3f} median {np.median(v):.3f} <0.1 {(v < 0.1).mean():.2f}"
      )
  # lesion size: bbox area fraction of image
  frac = {}
  for n in d:
    x, y, w, h = map(int, meta[n]["BBOX"].strip("[]").split(","))
    frac[n] = w * h / (int(meta[n]["Width"]) * int(meta[n]["Height"]))
  q = np.quantile(list(frac.values()), [0, 0.25, 0.5, 0.75, 1])
  for lo, hi in zip(q[:-1], q[1:]):
    v = np.array([d[n] for n in d if lo <= frac[n] <= hi])
    print(
      f"  bbox frac {lo:.3f}-{hi:.3f} n {len(v)} mean {v.mean():.3f} <0.1 {(v < 0.1).mean():.2f}"
    )
