#!/usr/bin/env python
"""Renders the benchmark results JSON files into ``benchmarks/RESULTS.md``.

Each ``benchmarks/results/*.json`` (written by ``train_step.py``, ``inference.py``,
``pipeline_throughput.py``) becomes one section: machine, date, commit, library versions, the exact
command, and its table.  The sections replace whatever is between the ``<!-- BEGIN GENERATED -->``
and ``<!-- END GENERATED -->`` markers of RESULTS.md; the hand-written analysis around them stays.

    python benchmarks/report.py                      # all results/*.json -> RESULTS.md
    python benchmarks/report.py results/a.json --stdout
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"


def section(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    d = json.load(f)
  m = d.get("machine", {})
  v = m.get("versions", {})
  libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "flax", "torch", "diffusers") if v.get(k))
  load = m.get("loadavg_at_start")
  kinds = sorted(
    {
      (r.get("backend") or {}).get("device_kind") or r.get("device")
      for r in d.get("records", [])
      if isinstance(r, dict)
    }
    - {None}
  )
  peak = m.get("cpu_peak_estimate") or {}
  # widest SIMD (timings on CPU depend on it); older records only hold FLOP/cycle/core
  simd = peak.get("simd") or {64: "avx512", 32: "avx2"}.get(peak.get("flop_per_cycle_per_core"))
  lines = [
    f"### `{os.path.relpath(path, HERE)}` — {d.get('benchmark', '?')}",
    "",
    f"- machine: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores, "
    f"{m.get('mem_gib') or 0:.0f} GiB"
    + (f", {simd}" if simd else "")
    + (f"; backend: {', '.join(kinds)}" if kinds else ""),
    f"- date {m.get('date', '?')}, commit `{(m.get('commit') or '?')[:10]}`"
    + (" (uncommitted changes)" if m.get("dirty") else "")
    + (f", load average at start {load[0]:.2f}" if load else ""),
    f"- {libs}; XLA_FLAGS={m.get('XLA_FLAGS') or '(none)'}",
    f"- command: `{m.get('command', '?')}`",
    "",
    d.get("table_markdown", "(no table)"),
    "",
  ]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("files", nargs="*", help="results JSON files (default: results/*.json, sorted)")
  p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
  p.add_argument("--stdout", action="store_true", help="print the sections instead of writing")
  args = p.parse_args(argv)
  files = args.files or sorted(glob.glob(os.path.join(HERE, "results", "*.json")))
  if not files:
    print("no results files", file=sys.stderr)
    return 1
  body = "\n".join(section(f) for f in files)
  if args.stdout:
    print(body)
    return 0
  text = (
    open(args.out, encoding="utf-8").read() if os.path.exists(args.out) else f"{BEGIN}\n{END}\n"
  )
  if BEGIN not in text or END not in text:
    print(f"{args.out}: markers {BEGIN} / {END} not found", file=sys.stderr)
    return 1
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  tmp = args.out + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(f"{head}{BEGIN}\n\n{body}\n{END}{tail}")
  os.replace(tmp, args.out)
  print(f"wrote {args.out} ({len(files)} sections)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
