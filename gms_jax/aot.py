"""``gms-jax compile``: compile the train step and inference for a TPU slice or GPU host from here.

    gms-jax compile --config configs/gms.py:busi --target v4-8 [--config.key=value ...]
                    [--num-slices N] [--inference-batch 64] [--json OUT]

The very step ``gms-jax train`` runs (:func:`gms_jax.step.build`) is lowered over the devices of a
``jax.experimental.topologies`` description of the target and compiled by the target's own XLA
compiler (libtpu for TPUs: ``pip install -e .[tpu]``; the CUDA plugin for GPUs:
``pip install -e .[cuda-aot]``), on this CPU host: no accelerator is needed. It prints, for the
train step and for inference: per-device memory (XLA's buffer assignment) against the chip's HBM,
FLOPs and bytes accessed per device, XLA's own time estimate where positive, a roofline step time
``max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)``, the images/s and MFU bound it implies, the
count of each collective in the optimized HLO, and the compile time. Times are estimates, not
measurements; the peaks used are in :data:`TARGETS` and printed.

The GPU backend gives no cost analysis: GPU FLOPs come from XLA's cost analysis of the same
per-device program lowered (not compiled) on this host, and the roofline is then compute-only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from typing import Any

from gms_jax import errors

# Dense peak FLOP/s per chip at the compute dtype. TPU: JAX's default precision runs float32
# convolutions as one bfloat16 MXU pass, so the float32 peak is the bfloat16 one. NVIDIA: float32
# convolutions use TF32 tensor cores by default (SXM datasheets, dense, no sparsity).

_H100_PROTO = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bw} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {mem} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{name}"
"""
_A100_PROTO = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 167936 threads_per_core_limit: 2048 core_count: 108
  fpus_per_core: 64 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 2039000000000 l2_cache_size: 41943040
  clock_rate_ghz: 1.41 device_memory_size: 85899345920 shared_memory_per_block_optin: 166912
  cuda_compute_capability { major: 8 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA A100-SXM4-80GB"
"""


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: dict[str, float]  # compute dtype ("float32" / "bfloat16") -> dense FLOP/s
  hbm_bytes: int
  hbm_bytes_per_s: float
  source: str


CHIPS = {
  "v4": Chip(
    "TPU v4",
    {"bfloat16": 275e12, "float32": 275e12},
    32 * 2**30,
    1.2e12,
    "cloud.google.com/tpu/docs/v4",
  ),
  "v5e": Chip(
    "TPU v5e",
    {"bfloat16": 197e12, "float32": 197e12},
    16 * 2**30,
    819e9,
    "cloud.google.com/tpu/docs/v5e",
  ),
  "v5p": Chip(
    "TPU v5p",
    {"bfloat16": 459e12, "float32": 459e12},
    95 * 2**30,
    2.765e12,
    "cloud.google.com/tpu/docs/v5p",
  ),
  "v6e": Chip(
    "TPU v6e",
    {"bfloat16": 918e12, "float32": 918e12},
    32 * 2**30,
    1.64e12,
    "cloud.google.com/tpu/docs/v6e",
  ),
  "h100": Chip(
    "NVIDIA H100 SXM 80GB",
    {"bfloat16": 989.4e12, "float32": 494.7e12},
    84_929_347_584,
    3.35e12,
    "NVIDIA H100 datasheet (TF32 for float32)",
  ),
  "h200": Chip(
    "NVIDIA H200 SXM 141GB",
    {"bfloat16": 989.4e12, "float32": 494.7e12},
    143_771 * 2**20,
    4.8e12,
    "NVIDIA H200 datasheet (TF32 for float32)",
  ),
  "a100": Chip(
    "NVIDIA A100 SXM 80GB",
    {"bfloat16": 312e12, "float32": 156e12},
    80 * 2**30,
    2.039e12,
    "NVIDIA A100 datasheet (TF32 for float32)",
  ),
}


@dataclasses.dataclass(frozen=True)
class Target:
  chip: str  # key of CHIPS
  platform: str  # "tpu" / "gpu"
  topology: str  # TPU topology name, or the GPU "1x1xN" topology
  chip_config: str | None = None  # TPU chip config ("megacore": one JAX device per v4/v5p chip)


def _tpu(chip: str, topo: str, megacore: bool = False) -> Target:
  return Target(chip, "tpu", f"{chip}:{topo}", "megacore" if megacore else None)


# Cloud TPU names: v4-N / v5p-N count TensorCores (2 per chip, one megacore device per chip);
# v5e-N / v6e-N count chips.
TARGETS = {
  "v4-8": _tpu("v4", "2x2x1", True),
  "v4-16": _tpu("v4", "2x2x2", True),
  "v4-32": _tpu("v4", "2x2x4", True),
  "v4-64": _tpu("v4", "2x4x4", True),
  "v4-128": _tpu("v4", "4x4x4", True),
  "v4-256": _tpu("v4", "4x4x8", True),
  "v4-512": _tpu("v4", "4x8x8", True),
  "v5e-4": _tpu("v5e", "2x2"),
  "v5e-8": _tpu("v5e", "2x4"),
  "v5e-16": _tpu("v5e", "4x4"),
  "v5e-64": _tpu("v5e", "8x8"),
  "v5e-256": _tpu("v5e", "16x16"),
  "v5p-8": _tpu("v5p", "2x2x1", True),
  "v5p-32": _tpu("v5p", "2x2x4", True),
  "v6e-8": _tpu("v6e", "2x4"),
  "v6e-16": _tpu("v6e", "4x4"),
  **{
    f"{g}x{n}": Target(g, "gpu", f"1x1x{n}") for g in ("h100", "h200", "a100") for n in (1, 2, 4, 8)
  },
}


class TargetError(errors.GmsError):
  """The target cannot be compiled for here (its compiler package is not installed): exit 1."""


def gpu_target_config(chip: str) -> str:
  """The ``GpuTargetConfigProto`` text for a GPU chip (what a deviceless GPU compile needs)."""
  if chip == "a100":
    return _A100_PROTO
  c = CHIPS[chip]
  return _H100_PROTO.format(
    bw=int(c.hbm_bytes_per_s),
    mem=c.hbm_bytes,
    name="NVIDIA H200" if chip == "h200" else "NVIDIA H100 80GB HBM3",
  )


def _prepare_env(platform: str) -> None:
  """Compile-only from a CPU host: JAX runs on CPU; libtpu must not look for a TPU VM."""
  import jax

  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")
  if platform == "tpu":
    for k, v in (
      ("TPU_SKIP_MDS_QUERY", "1"),
      ("TPU_ACCELERATOR_TYPE", "v4-8"),
      ("TPU_WORKER_HOSTNAMES", "localhost"),
      ("TPU_WORKER_ID", "0"),
      ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ):
      os.environ.setdefault(k, v)


def target_devices(name: str, num_slices: int = 1) -> list:
  """The devices of target ``name`` (a :data:`TARGETS` key) as a topology description."""
  if name not in TARGETS:
    raise errors.UsageError(f"unknown target {name!r}; one of {', '.join(TARGETS)}")
  t = TARGETS[name]
  _prepare_env(t.platform)
  from jax.experimental import topologies

  if t.platform == "tpu":
    if importlib.util.find_spec("libtpu") is None:
      raise TargetError(f"target {name} needs libtpu: pip install -e .[tpu]")
    kw = {"chip_config_name": t.chip_config} if t.chip_config else {}
    if num_slices > 1:
      kw["num_slices"] = num_slices
    return list(
      topologies.get_topology_desc(platform="tpu", topology_name=t.topology, **kw).devices
    )
  if num_slices > 1:
    raise errors.UsageError("--num-slices is for TPU targets")
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    raise TargetError(f"target {name} needs the CUDA plugin: pip install -e .[cuda-aot]")
  return list(
    topologies.get_topology_desc(
      platform="cuda", topology=t.topology, target_config=gpu_target_config(t.chip)
    ).devices
  )


# ----------------------------------------------------------------------------- facts of a program


def _memory(compiled) -> dict[str, int]:
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  out = {
    k: int(getattr(ma, f"{k}_size_in_bytes"))
    for k in ("argument", "output", "alias", "temp", "generated_code")
  }
  peak = getattr(ma, "peak_memory_in_bytes", None)
  # Live at once at worst: arguments + outputs that do not reuse a donated argument + scratch.
  out["peak"] = int(peak) if peak else out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def cost_of(obj) -> dict[str, float]:
  try:
    ca = obj.cost_analysis()
  except Exception:  # backends without a cost model
    return {}
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return {
    k: float(v)
    for k, v in (ca or {}).items()
    if k in ("flops", "bytes accessed", "optimal_seconds")
  }


def program_facts(
  compiled,
  *,
  images: int,
  chip: Chip,
  dtype_name: str,
  n_devices: int,
  compile_s: float,
  fallback_cost: dict[str, float] | None = None,
) -> dict[str, Any]:
  """Memory, cost, roofline and collectives of one compiled program (per device)."""
  from gms_jax import step as step_lib

  mem = _memory(compiled)
  cost = cost_of(compiled)
  flops_source = "compiled (XLA cost analysis of the optimized per-device program)"
  if not cost.get("flops") and fallback_cost:
    cost = {"flops": fallback_cost.get("flops")}
    flops_source = "lowered on this host (XLA cost analysis of the unoptimized per-device HLO)"
  peak = chip.peak_flops[dtype_name]
  flops, nbytes = cost.get("flops"), cost.get("bytes accessed")
  compute_s = flops / peak if flops else None
  memory_s = nbytes / chip.hbm_bytes_per_s if nbytes else None
  roofline_s = max(t for t in (compute_s, memory_s) if t) if (compute_s or memory_s) else None
  xla_s = cost.get("optimal_seconds")
  xla_s = xla_s if xla_s and xla_s > 0 else None
  hbm = chip.hbm_bytes
  return {
    "memory_bytes": mem,
    "hbm_bytes": hbm,
    "fits": (mem["peak"] <= hbm) if mem else None,
    "over_by_bytes": max(0, mem["peak"] - hbm) if mem else None,
    "flops_per_device": flops,
    "flops_source": flops_source,
    "bytes_accessed_per_device": nbytes,
    "xla_estimate_s": xla_s,
    "compute_bound_s": compute_s,
    "memory_bound_s": memory_s,
    "roofline_s": roofline_s,
    # Without a byte count (GPU) the roofline is the compute time alone: an upper bound on
    # images/s that ignores HBM traffic, and no MFU bound follows from it.
    "bound": None
    if roofline_s is None
    else (
      "compute only" if memory_s is None else "compute" if roofline_s == compute_s else "memory"
    ),
    "images_per_s": images / roofline_s if roofline_s else None,
    "images_per_s_per_chip": images / roofline_s / n_devices if roofline_s else None,
    "mfu_bound": compute_s / roofline_s if compute_s and memory_s else None,
    "peak_flops_per_chip": peak,
    "hbm_bytes_per_s": chip.hbm_bytes_per_s,
    "collectives": step_lib.collective_counts(compiled.as_text()),
    "compile_s": compile_s,
  }


def _host_cost(config, built, *, program: str, per_device: int) -> dict[str, float]:
  """FLOPs of the per-device program lowered for one host CPU device (GPU targets): ``program`` is
  a train step name, ``"predict"`` or ``"bank_encode"``."""
  import jax

  from gms_jax import parallel
  from gms_jax import step as step_lib

  host = step_lib.build(
    config,
    parallel.make_mesh(jax.devices("cpu")[:1]),
    tokenizer=built.tokenizer,
    global_batch=per_device,
    platform=built.platform,
  )
  if program == "predict":
    return cost_of(host.lower_predict(per_device))
  if program == "bank_encode":
    return cost_of(host.lower_bank_encode(per_device))
  return cost_of(host.lower_train(program))


def compile_for(
  config,
  target: str,
  *,
  num_slices: int = 1,
  inference_batch: int = 64,
  train_examples: int = 0,
  log=print,
) -> dict[str, Any]:
  """AOT-compiles every program ``gms-jax train`` runs for ``config`` (the train step(s) of its
  recipe, the bank encoder of the fast recipe) and inference for ``target``; returns the record.
  ``train_examples > 0`` sizes the schedule (steps per epoch, steps per phase, bank views) for
  :func:`schedule_estimate`."""
  import jax

  from gms_jax import parallel
  from gms_jax import step as step_lib

  devices = target_devices(target, num_slices)
  t = TARGETS[target]
  chip = CHIPS[t.chip]
  mesh = parallel.make_mesh(devices)
  n = len(devices)
  step_lib.enable_compilation_cache(config)
  global_bs = step_lib.global_batch_size(config, n)
  spe = max(int(train_examples) // global_bs, 1) if train_examples > 0 else 1
  built = step_lib.build(config, mesh, steps_per_epoch=spe)
  dtype_name = str(config.precision)
  per_device = built.global_batch_size // n
  rec: dict[str, Any] = {
    "target": target,
    "num_slices": num_slices,
    "devices": n,
    "platform": built.platform,
    "recipe": built.recipe,
    "steps_per_epoch_assumed": built.steps_per_epoch,
    "device_kind": str(devices[0].device_kind),
    "chip": dataclasses.asdict(chip),
    "tokenizer": built.tokenizer.family,
    "image_size": built.image_size,
    "precision": dtype_name,
    "remat_decoder": bool(built.tokenizer.remat_decoder),
    "global_batch": built.global_batch_size,
    "per_device_batch": per_device,
    "peak_lr": built.peak_lr,
    "loss": {k: v for k, v in built.loss_kw.items() if k not in ("heads", "classes")},
    "step_losses": {
      name: {k: v for k, v in kw.items() if k not in ("heads", "classes")}
      for name, kw in built.loss_kws.items()
    },
    "classes": {
      "num_classes": built.classes.num_classes,
      "mask_coding": built.classes.effective_coding,
      "mapper_out_channels": built.mapper_cfg.out_channels,
    },
    "jax": jax.__version__,
  }
  log(
    f"# {target}: {n} x {devices[0].device_kind}; {built.tokenizer.family} "
    f"{built.image_size}², {dtype_name}, recipe {built.recipe}, batch {per_device}/device "
    f"(global {built.global_batch_size}), peak LR {built.peak_lr:g}"
  )
  gpu = t.platform == "gpu"

  def facts(what: str, lowered, images: int, host_program: str, host_batch: int):
    log(f"# compiling {what} ...")
    t0 = time.time()
    compiled = lowered.compile()
    out = program_facts(
      compiled,
      images=images,
      chip=chip,
      dtype_name=dtype_name,
      n_devices=n,
      compile_s=time.time() - t0,
      fallback_cost=(
        _host_cost(config, built, program=host_program, per_device=host_batch) if gpu else None
      ),
    )
    del compiled
    if out.get("flops_per_device"):
      out["flops_per_image"] = out["flops_per_device"] * n / images
    return out

  # Every train step the recipe runs: "exact", or the banked "phase1" (+ "phase2").
  rec["steps"] = {
    name: facts(
      f"the train step {name!r}", built.lower_train(name), built.global_batch_size, name, per_device
    )
    for name in built.step_names
  }
  rec["train"] = rec["steps"][built.step_names[0]]  # the step most of the schedule runs
  rec["train"]["step"] = built.step_names[0]
  if built.recipe == "fast":  # what builds the latent bank: image + mask through the encoder
    n_enc = int(config.bank.encode_batch_size) * n
    rec["bank_encode"] = facts(
      f"the bank encoder at {config.bank.encode_batch_size}/device",
      built.lower_bank_encode(n_enc),
      n_enc,
      "bank_encode",
      int(config.bank.encode_batch_size),
    )
    rec["bank_encode"]["per_device_batch"] = int(config.bank.encode_batch_size)
  n_inf = inference_batch * n
  rec["inference"] = facts(
    f"inference at {inference_batch}/device",
    built.lower_predict(n_inf),
    n_inf,
    "predict",
    inference_batch,
  )
  rec["inference"]["per_device_batch"] = inference_batch
  if train_examples > 0:
    steps = (
      {"exact": built.total_steps}
      if built.recipe == "exact"
      else {"phase1": built.phase1_steps, "phase2": built.total_steps - built.phase1_steps}
    )
    rec["schedule"] = {
      "train_examples": int(train_examples),
      "steps_per_epoch": spe,
      "steps": steps,
      "bank_views": (
        int(train_examples) * int(config.bank.num_views) if built.recipe == "fast" else 0
      ),
    }
    rec["schedule_estimate_s"] = schedule_estimate(rec)
  return rec


# ----------------------------------------------------------------------------- table


def _gib(b):
  return "-" if b is None else f"{b / 2**30:.2f}"


def _pct(x):
  return "-" if x is None else f"{100 * x:.0f}%"


def _num(x, spec):
  return "-" if x is None else format(x, spec)


def programs(rec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  """``(column name, facts)`` of every program in a record: each train step the recipe runs,
  the bank encoder (fast recipe) and inference. Records written before the fast recipe was
  compiled hold only ``train`` and ``inference``."""
  steps = rec.get("steps") or {"train step": rec["train"]}
  out = [(name if name == "train step" else f"step {name}", p) for name, p in steps.items()]
  if rec.get("bank_encode"):
    out.append(("bank encode", rec["bank_encode"]))
  return out + [("inference", rec["inference"])]


def format_table(rec: dict[str, Any]) -> str:
  """The record as a markdown table: one column per compiled program."""
  cols = programs(rec)

  def fit(p):
    if p["fits"] is None:
      return "-"
    return "fits" if p["fits"] else f"OVER by {_gib(p['over_by_bytes'])} GiB"

  def coll(p):
    return ", ".join(f"{k} {v}" for k, v in p["collectives"].items() if v) or "none"

  def batch(name, p):
    return str(p.get("per_device_batch", rec["per_device_batch"]))

  def mem(key):
    return lambda name, p: _gib(p["memory_bytes"].get(key))

  def per(x, scale, spec):
    return _num(x and x / scale, spec)

  rows_spec = [
    ("batch per device", batch),
    ("arguments GiB / device", mem("argument")),
    ("temp GiB / device", mem("temp")),
    ("output GiB / device", mem("output")),
    ("peak GiB / device", mem("peak")),
    (f"HBM {_gib(rec['train']['hbm_bytes'])} GiB", lambda n, p: fit(p)),
    ("GFLOP / device", lambda n, p: per(p["flops_per_device"], 1e9, ".1f")),
    ("GFLOP / image", lambda n, p: per(p.get("flops_per_image"), 1e9, ".2f")),
    ("GB accessed / device", lambda n, p: per(p["bytes_accessed_per_device"], 1e9, ".2f")),
    ("XLA estimate ms", lambda n, p: per(p["xla_estimate_s"], 1e-3, ".1f")),
    ("roofline ms (estimate)", lambda n, p: per(p["roofline_s"], 1e-3, ".1f") + f" ({p['bound']})"),
    ("img/s bound (all chips)", lambda n, p: _num(p["images_per_s"], ".0f")),
    ("img/s bound per chip", lambda n, p: _num(p["images_per_s_per_chip"], ".1f")),
    ("MFU bound", lambda n, p: _pct(p["mfu_bound"])),
    ("collectives (optimized HLO)", lambda n, p: coll(p)),
    ("compile s", lambda n, p: _num(p["compile_s"], ".1f")),
  ]
  rows = [[label] + [f(name, p) for name, p in cols] for label, f in rows_spec]
  header = [""] + [name for name, _ in cols]
  widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]
  line = lambda r: "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
  chip = rec["chip"]
  head = (
    f"{rec['target']} ({rec['devices']} x {rec['device_kind']}), {rec['tokenizer']} "
    f"{rec['image_size']}², {rec['precision']}, remat {'on' if rec['remat_decoder'] else 'off'}"
    f", recipe {rec.get('recipe', 'exact')}, global batch {rec['global_batch']}, peak LR "
    f"{rec['peak_lr']:g}; compiled for the target on this host: times, img/s and MFU are "
    f"estimates (peak {chip['peak_flops'][rec['precision']] / 1e12:.1f} TFLOP/s and "
    f"{chip['hbm_bytes_per_s'] / 1e9:.0f} GB/s HBM per chip)"
  )
  out = [head, "", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  out += [line(r) for r in rows]
  est = schedule_estimate(rec)
  if est:
    out += [
      "",
      "whole schedule (estimate from the roofline bounds): "
      + ", ".join(f"{k} {v / 60:.1f} min" for k, v in est.items() if k.endswith("_s")).replace(
        "_s ", " "
      ),
    ]
  return "\n".join(out)


def schedule_estimate(rec: dict[str, Any]) -> dict[str, float]:
  """Seconds the whole schedule of ``rec["schedule"]`` (steps per phase, bank views) would take
  at the roofline bounds of the record's programs: an estimate, a lower bound on wall time
  (no input pipeline, no validation, no host overhead). Empty without a schedule."""
  sched = rec.get("schedule")
  steps = rec.get("steps") or {}
  if not sched:
    return {}
  out: dict[str, float] = {}
  for name, n in sched.get("steps", {}).items():
    t = steps.get(name, {}).get("roofline_s")
    if t and n:
      out[f"{name}_s"] = n * t
  enc = rec.get("bank_encode")
  if enc and enc.get("roofline_s") and sched.get("bank_views"):
    out["bank_build_s"] = sched["bank_views"] / enc["images_per_s"]
  if out:
    out["total_s"] = sum(out.values())
  return out


SUMMARY_HEADERS = (
  "target",
  "tokenizer",
  "dtype",
  "remat",
  "batch/chip",
  "peak GiB / HBM",
  "GFLOP/chip",
  "GB/chip",
  "XLA est. ms",
  "roofline ms",
  "img/s/chip (est.)",
  "MFU bound",
  "infer img/s/chip @64 (est.)",
  "train collectives",
  "infer collectives",
  "compile s",
)


def summary_row(rec: dict[str, Any]) -> list[str]:
  """One line of a multi-target table (``benchmarks/aot_table.py``) from a record."""
  tr, inf = rec["train"], rec["inference"]
  mem = tr["memory_bytes"]
  fit = "fits" if tr["fits"] else f"OVER +{_gib(tr['over_by_bytes'])}"
  coll = lambda p: ", ".join(f"{k} {v}" for k, v in p["collectives"].items() if v) or "none"  # noqa: E731
  return [
    rec["target"],
    rec["tokenizer"],
    rec["precision"],
    "on" if rec["remat_decoder"] else "off",
    str(rec["per_device_batch"]),
    f"{_gib(mem.get('peak'))} / {_gib(tr['hbm_bytes'])} {fit}",
    _num(tr["flops_per_device"] and tr["flops_per_device"] / 1e9, ".0f"),
    _num(tr["bytes_accessed_per_device"] and tr["bytes_accessed_per_device"] / 1e9, ".1f"),
    _num(tr["xla_estimate_s"] and tr["xla_estimate_s"] * 1e3, ".0f"),
    _num(tr["roofline_s"] and tr["roofline_s"] * 1e3, ".1f") + f" ({tr['bound']})",
    _num(tr["images_per_s_per_chip"], ".0f"),
    _pct(tr["mfu_bound"]),
    _num(inf["images_per_s_per_chip"], ".0f"),
    coll(tr),
    coll(inf),
    f"{tr['compile_s']:.0f} + {inf['compile_s']:.0f}",
  ]


# ----------------------------------------------------------------------------- entry point
