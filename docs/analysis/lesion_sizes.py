"""Lesion area as a fraction of the image, per dataset: are BUS-BRA's lesions smaller than BUSI's?

    python docs/analysis/lesion_sizes.py /path/to/busi /path/to/bus-bra

Reads every mask in ROOT/masks (foreground = value >= 128, at the mask's native size) and prints
the count, the 5/10/25/50/75/90th percentiles of the foreground fraction and the share of masks
under 5 % of the image. (Asked before trying a zoom-out augmentation for BUS-BRA: if its lesions
were smaller, shrinking BUSI's in training would move them closer.)
"""

import os
import sys

import cv2
import numpy as np

QUANTILES = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90)


def fractions(root):
  folder = os.path.join(root, "masks")
  out = []
  for name in sorted(os.listdir(folder)):
    m = cv2.imread(os.path.join(folder, name), cv2.IMREAD_GRAYSCALE)
    if m is None:
      print(f"{folder}/{name}: not an image, skipped", file=sys.stderr)
      continue
    out.append(float((m >= 128).mean()))
  return np.array(out)


def main(roots):
  print(
    "| dataset | masks | " + " | ".join(f"p{int(q * 100)}" for q in QUANTILES) + " | share < 5 % |"
  )
  print("|---|---|" + "---|" * len(QUANTILES) + "---|")
  for root in roots:
    f = fractions(root)
    qs = np.quantile(f, QUANTILES)
    print(
      f"| {os.path.basename(os.path.normpath(root))} | {len(f)} | "
      + " | ".join(f"{q:.4f}" for q in qs)
      + f" | {(f < 0.05).mean():.3f} |"
    )


if __name__ == "__main__":
  main(sys.argv[1:])
