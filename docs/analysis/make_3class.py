"""A 3-class folder (background 0 / benign lesion 1 / malignant lesion 2) from binary BUSI or
BUS-BRA and each image's pathology: BUSI's file names (benign_*, malignant_*), BUS-BRA's
bus_data.csv (ID, Pathology). Label map = (mask >= 128) * class id; images are hard-linked;
split files (*.pkl, split.json) are copied, so BUSI keeps the GMS split.

python docs/analysis/make_3class.py busi /path/to/busi /path/to/busi-3class
python docs/analysis/make_3class.py bus-bra /path/to/bus-bra /path/to/bus-bra-3class
"""

import csv
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image

LABELS = {"background": 0, "benign": 1, "malignant": 2}

kind, src, dst = sys.argv[1:4]
if os.path.exists(dst):
  sys.exit(f"{dst} exists; choose a new folder")
stems = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(src, "masks")))
if kind == "busi":
  pathology = {s: s.split("_")[0] for s in stems}
else:
  with open(os.path.join(src, "bus_data.csv"), newline="") as f:
    table = {r["ID"]: r["Pathology"].strip().lower() for r in csv.DictReader(f)}
  pathology = {s: table[s] for s in stems}
os.makedirs(os.path.join(dst, "images"))
os.makedirs(os.path.join(dst, "masks"))
for s in stems:
  image = os.path.join(src, "images", s + ".png")
  try:
    os.link(image, os.path.join(dst, "images", s + ".png"))
  except OSError:
    shutil.copyfile(image, os.path.join(dst, "images", s + ".png"))
  lesion = np.asarray(Image.open(os.path.join(src, "masks", s + ".png")).convert("L")) >= 128
  label = (lesion * LABELS[pathology[s]]).astype(np.uint8)
  Image.fromarray(label, mode="L").save(os.path.join(dst, "masks", s + ".png"))
for f in os.listdir(src):
  if f.endswith(".pkl") or f == "split.json":
    shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
with open(os.path.join(dst, "dataset.json"), "w") as f:
  json.dump({"name": f"{kind}-3class", "labels": LABELS}, f, indent=2)
counts = {c: sum(v == c for v in pathology.values()) for c in ("benign", "malignant")}
print(f"{dst}: {len(stems)} cases {counts}")
