"""Shared driver/worker machinery of the ``benchmarks/`` scripts (not part of ``gms_jax``):
arguments, machine description, timing and statistics, synthetic batches, worker subprocesses,
result files and tables. The frameworks' sides are in ``_weights.py`` (identical weights for
both), ``_jax_side.py`` (the product's step builder and XLA's analyses) and ``_torch_side.py``.

Each benchmark script is a *driver*: it prepares identical weights for both frameworks once
(PyTorch modules built from a seed, converted to Flax with the product's converters, both written
to a cache folder), then runs every measured variant in its **own subprocess** (a *worker*), so
that peak memory is attributable to one framework / one variant and the two frameworks never share
a thread pool.  Workers write one JSON record each; the driver prints a table and writes all
records plus the machine description to a JSON results file.

Workers that measure JAX never import torch (the JAX side reads the converted ``.safetensors``),
so their RSS is JAX's alone.

Timing: wall clock around a step, after ``jax.block_until_ready`` (JAX) or
``torch.cuda.synchronize`` (PyTorch on a GPU; PyTorch CPU ops are synchronous).  JAX steps are
AOT-compiled first (``jit(...).lower(...).compile()``) and compile time is reported separately.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(REPO))

DEFAULT_TAEF2 = os.environ.get("GMS_TAEF2_DIR", str(REPO.parent / "shared" / "weights" / "taef2"))
TOKENIZERS = ("sd-vae", "taef2")
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0"

# ============================================================================ arguments


def base_parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  p.add_argument(
    "--tokenizer",
    choices=("sd-vae", "taef2", "both"),
    default=None,
    help="default: both (--quick: sd-vae, the tiny config)",
  )
  p.add_argument("--frameworks", choices=("jax", "torch", "both"), default="both")
  p.add_argument("--size", type=int, default=224, help="image side (latents are size/8)")
  p.add_argument("--repeats", type=int, default=5, help="timed repetitions")
  p.add_argument("--warmup", type=int, default=1, help="untimed repetitions after compilation")
  p.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="compute dtype (bfloat16 is meant for GPUs; PyTorch uses autocast)",
  )
  p.add_argument(
    "--threads",
    type=int,
    default=os.cpu_count(),
    help="torch.set_num_threads (XLA:CPU uses one thread per core)",
  )
  p.add_argument(
    "--taef2",
    default=DEFAULT_TAEF2,
    help="folder with taef2_{encoder,decoder}.pth; random TAEF2 weights if missing",
  )
  p.add_argument(
    "--sd-vae",
    default="",
    help="diffusers AutoencoderKL folder for real SD weights (default: random init; "
    "speed does not depend on the values)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--quick",
    action="store_true",
    help="smoke run for CI (numbers meaningless): tiny SD config only, 32x32, batch 2, "
    "1 repeat, no warmup, 1 PyTorch thread",
  )
  p.add_argument("--out", default="", help="results JSON (default benchmarks/results/<name>.json)")
  p.add_argument("--cache", default="", help="folder for the shared weights (default: a temp dir)")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: JSON job spec
  return p


def apply_quick(args) -> None:
  """``--quick``: the smallest run that still goes through every code path."""
  if args.tokenizer is None:
    args.tokenizer = "sd-vae" if args.quick else "both"
  if getattr(args, "remat", "") is None:
    args.remat = "off" if args.quick else "both"
  if args.quick:
    args.size, args.repeats, args.warmup, args.threads = 32, 1, 0, 1
    if hasattr(args, "batch"):
      args.batch = 2
    if hasattr(args, "batches"):
      args.batches = "1"


def tokenizer_list(args) -> list[str]:
  return list(TOKENIZERS) if args.tokenizer == "both" else [args.tokenizer]


def framework_list(args) -> list[str]:
  return ["jax", "torch"] if args.frameworks == "both" else [args.frameworks]


# ============================================================================ machine / stats


def _git(*cmd) -> str:
  try:
    return subprocess.run(
      ["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()
  except Exception:
    return ""


def cpu_model() -> str:
  from gms_jax import run_metadata

  return run_metadata.cpu_info()["model"] or platform.processor() or platform.machine()


def cpu_peak_flops(n_cores: int) -> dict[str, Any]:
  """A rough fp32 peak for x86: cores x nominal MHz x FLOP/cycle (AVX-512: 64, AVX2+FMA: 32)."""
  from gms_jax import run_metadata

  info = run_metadata.cpu_info()
  if not info["simd"]:
    return {}
  per_cycle = {"avx512": 64, "avx2": 32}.get(info["simd"], 16)
  return {
    "mhz": info["mhz"],
    "simd": info["simd"],
    "flop_per_cycle_per_core": per_cycle,
    "peak_flops": n_cores * info["mhz"] * 1e6 * per_cycle,
    "note": "nominal clock x 2 FMA pipes x SIMD width; an estimate",
  }


def machine_info() -> dict[str, Any]:
  """Host, library versions and commit: everything a reader needs to reproduce a table."""
  import importlib.metadata as md

  vers = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "numpy"):
    try:
      vers[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      vers[pkg] = None
  n = os.cpu_count() or 1
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  try:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError):
    mem_gib = None
  return {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": _git("rev-parse", "HEAD"),
    "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    "cpu": cpu_model(),
    "cpu_count": n,
    "mem_gib": mem_gib,
    "cpus_allowed": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    "loadavg_at_start": load,
    "cpu_peak_estimate": cpu_peak_flops(n),
    "python": platform.python_version(),
    "platform": platform.platform(),
    "versions": vers,
    "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    "command": " ".join([Path(sys.executable).name] + sys.argv),
  }


def stats(times: Sequence[float]) -> dict[str, float]:
  """Median and spread of repeated timings (seconds)."""
  t = sorted(times)
  if not t:
    return {}
  q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0], t[0], t[0]]
  return {
    "median_s": statistics.median(t),
    "min_s": t[0],
    "max_s": t[-1],
    "iqr_s": q[2] - q[0],
    "mean_s": statistics.fmean(t),
    "std_s": statistics.stdev(t) if len(t) >= 2 else 0.0,
    "n": len(t),
  }


def rss_bytes() -> int:
  """Current resident set size of this process."""
  try:
    with open("/proc/self/statm", encoding="utf-8") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return 0


def peak_rss_bytes() -> int:
  """High-water RSS of this process since it started (``ru_maxrss``)."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(r) * (1 if sys.platform == "darwin" else 1024)


class RssSampler:
  """Samples the process RSS in a background thread (the heavy work runs in C++ without the GIL):
  ``with RssSampler() as s: step()`` then ``s.peak`` is the peak RSS during the block, which
  ``ru_maxrss`` cannot give once compilation has set a higher mark."""

  def __init__(self, interval_s: float = 0.005):
    self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, rss_bytes())
      time.sleep(self.interval_s)

  def __enter__(self):
    self.peak = rss_bytes()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())


def timed(
  fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[Any], Any]
) -> tuple[list[float], int, Any]:
  """Runs ``fn`` ``warmup`` then ``repeats`` times; returns (seconds per repeat, peak RSS during
  the repeats, last result)."""
  out = None
  for _ in range(warmup):
    out = sync(fn())
  times = []
  with RssSampler() as sampler:
    for _ in range(max(repeats, 1)):
      t0 = time.perf_counter()
      out = sync(fn())
      times.append(time.perf_counter() - t0)
  return times, sampler.peak, out


# ============================================================================ data


def make_batch(batch: int, size: int, seed: int = 0):
  """Deterministic images in [0,1] (B,S,S,3) and binary ellipse masks (B,S,S), float32 numpy."""
  import numpy as np

  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
  images = np.empty((batch, size, size, 3), np.float32)
  masks = np.empty((batch, size, size), np.float32)
  for i in range(batch):
    cy, cx = rng.uniform(0.3, 0.7, 2)
    ry, rx = rng.uniform(0.1, 0.3, 2)
    m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    masks[i] = m
    base = rng.uniform(0.2, 0.8, 3)
    images[i] = np.clip(
      base + 0.3 * m[..., None] + 0.1 * rng.standard_normal((size, size, 3)), 0, 1
    )
  return images, masks


# ============================================================================ driver helpers


def run_worker(
  script: str, job: dict[str, Any], *, timeout_s: float | None = None
) -> dict[str, Any]:
  """Runs ``python script --worker JOB`` in a fresh process; returns its JSON record (or an error
  record with the exit status and the tail of stderr, e.g. when the kernel killed it for memory)."""
  fd, result_path = tempfile.mkstemp(prefix="gms_bench_", suffix=".json")
  os.close(fd)
  job = dict(job, result_path=result_path)
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if job.get("quick"):  # smoke runs: skip LLVM optimisation (halves XLA:CPU compile time)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + QUICK_XLA_FLAGS).strip()
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(
      [sys.executable, script, "--worker", json.dumps(job)],
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout_s,
      check=False,
    )
    rc, err = proc.returncode, proc.stderr
  except subprocess.TimeoutExpired as e:
    rc, err = (
      "timeout",
      (e.stderr or b"").decode(errors="replace")
      if isinstance(e.stderr, bytes)
      else (e.stderr or ""),
    )
  wall = time.perf_counter() - t0
  try:
    with open(result_path, encoding="utf-8") as f:
      rec = json.load(f)
  except (OSError, ValueError):
    rec = None
  finally:
    if os.path.exists(result_path):
      os.remove(result_path)
  if rec is None:
    hint = " (killed: out of memory?)" if rc in (-9, 137) else ""
    rec = {k: job.get(k) for k in ("framework", "tokenizer", "variant", "batch", "size")}
    rec["error"] = f"worker exit status {rc}{hint}: " + "\n".join(err.strip().splitlines()[-8:])
  rec["worker_wall_s"] = wall
  return rec


def finish_record(
  rec: dict[str, Any], step_peak_rss: int, device_memory: dict[str, Any] | None = None
) -> dict[str, Any]:
  """Adds the memory fields every worker ends with: the RSS peak sampled during the timed calls,
  the process's lifetime peak RSS, and device memory (``_jax_side.jax_memory_stats()`` or
  ``_torch_side.torch_memory_stats(dev)``)."""
  rec.update(
    step_peak_rss_bytes=step_peak_rss,
    ru_maxrss_bytes=peak_rss_bytes(),
    device_memory=device_memory or {},
  )
  return rec


def pool_rounds(recs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One record from the same variant's workers in several rounds (``--rounds``): the timed
  repeats pooled (stats recomputed), each round's median kept, peak RSS the highest; the first
  failed round's record if any failed."""
  failed = [r for r in recs if "error" in r]
  if failed:
    return failed[0]
  rec = dict(recs[0])
  if len(recs) == 1 or "times_s" not in rec:
    return rec
  times = [t for r in recs for t in r["times_s"]]
  rec.update(
    stats(times),
    times_s=times,
    rounds=len(recs),
    round_medians_s=[r["median_s"] for r in recs],
    step_peak_rss_bytes=max(r["step_peak_rss_bytes"] for r in recs),
    ru_maxrss_bytes=max(r.get("ru_maxrss_bytes") or 0 for r in recs),
    worker_wall_s=sum(r.get("worker_wall_s") or 0.0 for r in recs),
  )
  return rec


def worker_main(args, jax_worker: Callable, torch_worker: Callable) -> int:
  """The ``--worker JOB`` entry point of a benchmark script: run the job, write its record."""
  job = json.loads(args.worker)
  rec = (jax_worker if job["framework"] == "jax" else torch_worker)(job)
  write_worker_result(job, rec)
  return 0


def write_worker_result(job: dict[str, Any], rec: dict[str, Any]) -> None:
  base = {k: job.get(k) for k in ("framework", "tokenizer", "variant", "batch", "size", "dtype")}
  base["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
  with open(job["result_path"], "w", encoding="utf-8") as f:
    json.dump({**base, **rec}, f, indent=1, default=str)


def results_path(args, name: str) -> str:
  return args.out or str(REPO / "benchmarks" / "results" / f"{name}.json")


def write_results(path: str, payload: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1, default=str)
  print(f"\nwrote {path}")


def fmt(x, spec: str = ".3g", none: str = "-") -> str:
  if x is None:
    return none
  if isinstance(x, str):
    return x
  return format(x, spec)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-markdown table (also readable in a terminal); returns the text it printed."""
  cells = [[str(c) for c in r] for r in rows]
  widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
  text = "\n".join(
    [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells]
  )
  print(text)
  return text


def cache_dir(args) -> tuple[str, Any]:
  """The weights cache folder and a cleanup handle (a TemporaryDirectory, or None if given)."""
  if args.cache:
    return args.cache, None
  tmp = tempfile.TemporaryDirectory(prefix="gms_bench_")
  return tmp.name, tmp


def gib(b) -> float | None:
  return None if b is None else b / 2**30
