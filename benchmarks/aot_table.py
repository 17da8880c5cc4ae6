#!/usr/bin/env python
"""Markdown table of ``gms-jax compile --json`` records (one row per file), for RESULTS.md.

python benchmarks/aot_table.py benchmarks/results/aot/*.json
"""

from __future__ import annotations

import json
import sys

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import _common as C

from gms_jax import aot


def main(paths: list[str]) -> int:
  recs = []
  for p in paths:
    with open(p, encoding="utf-8") as f:
      recs.append(json.load(f))
  recs.sort(key=lambda r: (r["target"], r["tokenizer"], r["precision"], r["per_device_batch"]))
  C.print_table(aot.SUMMARY_HEADERS, [aot.summary_row(r) for r in recs])
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
