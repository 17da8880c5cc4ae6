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
import json
import os
import sys
import time
from typing import Any

from absl import flags
from ml_collections import config_flags

from gms_jax import configuration
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
    "v4": Chip("TPU v4", {"bfloat16": 275e12, "float32": 275e12}, 32 * 2**30, 1.2e12,
               "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", {"bfloat16": 197e12, "float32": 197e12}, 16 * 2**30, 819e9,
                "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", {"bfloat16": 459e12, "float32": 459e12}, 95 * 2**30, 2.765e12,
                "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", {"bfloat16": 918e12, "float32": 918e12}, 32 * 2**30, 1.64e12,
                "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("NVIDIA H100 SXM 80GB", {"bfloat16": 989.4e12, "float32": 494.7e12},
                 84_929_347_584, 3.35e12, "NVIDIA H100 datasheet (TF32 for float32)"),
    "h200": Chip("NVIDIA H200 SXM 141GB", {"bfloat16": 989.4e12, "float32": 494.7e12},
                 143_771 * 2**20, 4.8e12, "NVIDIA H200 datasheet (TF32 for float32)"),
    "a100": Chip("NVIDIA A100 SXM 80GB", {"bfloat16": 312e12, "float32": 156e12},
                 80 * 2**30, 2.039e12, "NVIDIA A100 datasheet (TF32 for float32)"),
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
    "v4-8": _tpu("v4", "2x2x1", True), "v4-16": _tpu("v4", "2x2x2", True),
    "v4-32": _tpu("v4", "2x2x4", True), "v4-64": _tpu("v4", "2x4x4", True),
    "v4-128": _tpu("v4", "4x4x4", True), "v4-256": _tpu("v4", "4x4x8", True),
    "v4-512": _tpu("v4", "4x8x8", True),
    "v5e-4": _tpu("v5e", "2x2"), "v5e-8": _tpu("v5e", "2x4"),
    "v5e-16": _tpu("v5e", "4x4"), "v5e-64": _tpu("v5e", "8x8"), "v5e-256": _tpu("v5e", "16x16"),
    "v5p-8": _tpu("v5p", "2x2x1", True), "v5p-32": _tpu("v5p", "2x2x4", True),
    "v6e-8": _tpu("v6e", "2x4"), "v6e-16": _tpu("v6e", "4x4"),
    **{f"{g}x{n}": Target(g, "gpu", f"1x1x{n}") for g in ("h100", "h200", "a100")
       for n in (1, 2, 4, 8)},
}


class TargetError(errors.GmsError):
  """The target cannot be compiled for here (its compiler package is not installed): exit 1."""


def gpu_target_config(chip: str) -> str:
  """The ``GpuTargetConfigProto`` text for a GPU chip (what a deviceless GPU compile needs)."""
  if chip == "a100":
    return _A100_PROTO
  c = CHIPS[chip]
  return _H100_PROTO.format(bw=int(c.hbm_bytes_per_s), mem=c.hbm_bytes,
                            name="NVIDIA H200" if chip == "h200" else "NVIDIA H100 80GB HBM3")


def _prepare_env(platform: str) -> None:
  """Compile-only from a CPU host: JAX runs on CPU; libtpu must not look for a TPU VM."""
  import jax  # pylint: disable=import-outside-toplevel
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")
  if platform == "tpu":
    for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v4-8"),
                 ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                 ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
      os.environ.setdefault(k, v)


def target_devices(name: str, num_slices: int = 1) -> list:
  """The devices of target ``name`` (a :data:`TARGETS` key) as a topology description."""
  if name not in TARGETS:
    raise errors.UsageError(f"unknown target {name!r}; one of {', '.join(TARGETS)}")
  t = TARGETS[name]
  _prepare_env(t.platform)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  if t.platform == "tpu":
    if importlib.util.find_spec("libtpu") is None:
      raise TargetError(f"target {name} needs libtpu: pip install -e .[tpu]")
    kw = {"chip_config_name": t.chip_config} if t.chip_config else {}
    if num_slices > 1:
      kw["num_slices"] = num_slices
    return list(topologies.get_topology_desc(platform="tpu", topology_name=t.topology,
                                             **kw).devices)
  if num_slices > 1:
    raise errors.UsageError("--num-slices is for TPU targets")
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    raise TargetError(f"target {name} needs the CUDA plugin: pip install -e .[cuda-aot]")
  return list(topologies.get_topology_desc(platform="cuda", topology=t.topology,
                                           target_config=gpu_target_config(t.chip)).devices)


# ----------------------------------------------------------------------------- facts of a program


def _memory(compiled) -> dict[str, int]:
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  out = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
  peak = getattr(ma, "peak_memory_in_bytes", None)
  # Live at once at worst: arguments + outputs that do not reuse a donated argument + scratch.
  out["peak"] = int(peak) if peak else out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def _cost(obj) -> dict[str, float]:
  try:
    ca = obj.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (backends without a cost model)
    return {}
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return {k: float(v) for k, v in (ca or {}).items()
          if k in ("flops", "bytes accessed", "optimal_seconds")}


def program_facts(compiled, *, images: int, chip: Chip, dtype_name: str, n_devices: int,
                  compile_s: float, fallback_cost: dict[str, float] | None = None
                  ) -> dict[str, Any]:
  """Memory, cost, roofline and collectives of one compiled program (per device)."""
  from gms_jax import step as step_lib  # pylint: disable=import-outside-toplevel
  mem = _memory(compiled)
  cost = _cost(compiled)
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
      "memory_bytes": mem, "hbm_bytes": hbm,
      "fits": (mem["peak"] <= hbm) if mem else None,
      "over_by_bytes": max(0, mem["peak"] - hbm) if mem else None,
      "flops_per_device": flops, "flops_source": flops_source,
      "bytes_accessed_per_device": nbytes,
      "xla_estimate_s": xla_s,
      "compute_bound_s": compute_s, "memory_bound_s": memory_s,
      "roofline_s": roofline_s,
      # Without a byte count (GPU) the roofline is the compute time alone: an upper bound on
      # images/s that ignores HBM traffic, and no MFU bound follows from it.
      "bound": None if roofline_s is None else (
          "compute only" if memory_s is None else
          "compute" if roofline_s == compute_s else "memory"),
      "images_per_s": images / roofline_s if roofline_s else None,
      "images_per_s_per_chip": images / roofline_s / n_devices if roofline_s else None,
      "mfu_bound": compute_s / roofline_s if compute_s and memory_s else None,
      "peak_flops_per_chip": peak, "hbm_bytes_per_s": chip.hbm_bytes_per_s,
      "collectives": step_lib.collective_counts(compiled.as_text()),
      "compile_s": compile_s,
  }


def _host_cost(config, built, *, train: bool, per_device: int) -> dict[str, float]:
  """FLOPs of the per-device program lowered for one host CPU device (GPU targets)."""
  import jax  # pylint: disable=import-outside-toplevel
  from gms_jax import parallel  # pylint: disable=import-outside-toplevel
  from gms_jax import step as step_lib  # pylint: disable=import-outside-toplevel
  host = step_lib.build(config, parallel.make_mesh(jax.devices("cpu")[:1]),
                        tokenizer=built.tokenizer, global_batch=per_device,
                        platform=built.platform)
  return _cost(host.lower_train() if train else host.lower_predict(per_device))


def compile_for(config, target: str, *, num_slices: int = 1, inference_batch: int = 64,
                log=print) -> dict[str, Any]:
  """AOT-compiles train step and inference of ``config`` for ``target``; returns the record."""
  import jax  # pylint: disable=import-outside-toplevel
  from gms_jax import parallel  # pylint: disable=import-outside-toplevel
  from gms_jax import step as step_lib  # pylint: disable=import-outside-toplevel
  devices = target_devices(target, num_slices)
  t = TARGETS[target]
  chip = CHIPS[t.chip]
  mesh = parallel.make_mesh(devices)
  n = len(devices)
  step_lib.enable_compilation_cache(config)
  built = step_lib.build(config, mesh)
  dtype_name = str(config.precision)
  per_device = built.global_batch_size // n
  rec: dict[str, Any] = {
      "target": target, "num_slices": num_slices, "devices": n, "platform": built.platform,
      "device_kind": str(devices[0].device_kind), "chip": dataclasses.asdict(chip),
      "tokenizer": built.tokenizer.family, "image_size": built.image_size,
      "precision": dtype_name, "remat_decoder": bool(built.tokenizer.remat_decoder),
      "global_batch": built.global_batch_size, "per_device_batch": per_device,
      "peak_lr": built.peak_lr, "loss": {k: v for k, v in built.loss_kw.items() if k != "heads"},
      "jax": jax.__version__,
  }
  log(f"# {target}: {n} x {devices[0].device_kind}; {built.tokenizer.family} "
      f"{built.image_size}², {dtype_name}, batch {per_device}/device (global "
      f"{built.global_batch_size}); compiling the train step ...")
  t0 = time.time()
  compiled = built.lower_train().compile()
  rec["train"] = program_facts(
      compiled, images=built.global_batch_size, chip=chip, dtype_name=dtype_name, n_devices=n,
      compile_s=time.time() - t0,
      fallback_cost=(_host_cost(config, built, train=True, per_device=per_device)
                     if t.platform == "gpu" else None))
  del compiled
  n_inf = inference_batch * n
  log(f"# compiling inference at {inference_batch}/device ...")
  t0 = time.time()
  compiled = built.lower_predict(n_inf).compile()
  rec["inference"] = program_facts(
      compiled, images=n_inf, chip=chip, dtype_name=dtype_name, n_devices=n,
      compile_s=time.time() - t0,
      fallback_cost=(_host_cost(config, built, train=False, per_device=inference_batch)
                     if t.platform == "gpu" else None))
  rec["inference"]["per_device_batch"] = inference_batch
  return rec


# ----------------------------------------------------------------------------- table


def _gib(b):
  return "-" if b is None else f"{b / 2**30:.2f}"


def _pct(x):
  return "-" if x is None else f"{100 * x:.0f}%"


def _num(x, spec):
  return "-" if x is None else format(x, spec)


def format_table(rec: dict[str, Any]) -> str:
  """The record as a two-column (train step, inference) markdown table."""
  tr, inf = rec["train"], rec["inference"]

  def fit(p):
    if p["fits"] is None:
      return "-"
    return "fits" if p["fits"] else f"OVER by {_gib(p['over_by_bytes'])} GiB"

  def coll(p):
    return ", ".join(f"{k} {v}" for k, v in p["collectives"].items() if v) or "none"

  rows = [
      ("batch per device", str(rec["per_device_batch"]), str(inf["per_device_batch"])),
      ("arguments GiB / device", _gib(tr["memory_bytes"].get("argument")),
       _gib(inf["memory_bytes"].get("argument"))),
      ("temp GiB / device", _gib(tr["memory_bytes"].get("temp")),
       _gib(inf["memory_bytes"].get("temp"))),
      ("output GiB / device", _gib(tr["memory_bytes"].get("output")),
       _gib(inf["memory_bytes"].get("output"))),
      ("peak GiB / device", _gib(tr["memory_bytes"].get("peak")),
       _gib(inf["memory_bytes"].get("peak"))),
      (f"HBM {_gib(tr['hbm_bytes'])} GiB", fit(tr), fit(inf)),
      ("GFLOP / device", _num(tr["flops_per_device"] and tr["flops_per_device"] / 1e9, ".1f"),
       _num(inf["flops_per_device"] and inf["flops_per_device"] / 1e9, ".1f")),
      ("GB accessed / device",
       _num(tr["bytes_accessed_per_device"] and tr["bytes_accessed_per_device"] / 1e9, ".2f"),
       _num(inf["bytes_accessed_per_device"] and inf["bytes_accessed_per_device"] / 1e9, ".2f")),
      ("XLA estimate ms", _num(tr["xla_estimate_s"] and tr["xla_estimate_s"] * 1e3, ".1f"),
       _num(inf["xla_estimate_s"] and inf["xla_estimate_s"] * 1e3, ".1f")),
      ("roofline ms (estimate)", _num(tr["roofline_s"] and tr["roofline_s"] * 1e3, ".1f")
       + f" ({tr['bound']})", _num(inf["roofline_s"] and inf["roofline_s"] * 1e3, ".1f")
       + f" ({inf['bound']})"),
      ("img/s bound (all chips)", _num(tr["images_per_s"], ".0f"), _num(inf["images_per_s"], ".0f")),
      ("img/s bound per chip", _num(tr["images_per_s_per_chip"], ".1f"),
       _num(inf["images_per_s_per_chip"], ".1f")),
      ("MFU bound", _pct(tr["mfu_bound"]), _pct(inf["mfu_bound"])),
      ("collectives (optimized HLO)", coll(tr), coll(inf)),
      ("compile s", _num(tr["compile_s"], ".1f"), _num(inf["compile_s"], ".1f")),
  ]
  w0 = max(len(r[0]) for r in rows)
  w1 = max(len(r[1]) for r in rows + [("", "train step")])
  w2 = max(len(r[2]) for r in rows + [("", "", "inference")])
  line = lambda a, b, c: f"| {a.ljust(w0)} | {b.ljust(w1)} | {c.ljust(w2)} |"  # noqa: E731
  chip = rec["chip"]
  head = (f"{rec['target']} ({rec['devices']} x {rec['device_kind']}), {rec['tokenizer']} "
          f"{rec['image_size']}², {rec['precision']}, remat {'on' if rec['remat_decoder'] else 'off'}"
          f", global batch {rec['global_batch']}; compiled for the target on this host: times, "
          f"img/s and MFU are estimates (peak {chip['peak_flops'][rec['precision']] / 1e12:.1f} "
          f"TFLOP/s and {chip['hbm_bytes_per_s'] / 1e9:.0f} GB/s HBM per chip)")
  return "\n".join([head, "", line("", "train step", "inference"),
                    f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|{'-' * (w2 + 2)}|"]
                   + [line(*r) for r in rows])


SUMMARY_HEADERS = ("target", "tokenizer", "dtype", "remat", "batch/chip", "peak GiB / HBM",
                   "GFLOP/chip", "GB/chip", "XLA est. ms", "roofline ms", "img/s/chip (est.)",
                   "MFU bound", "infer img/s/chip @64 (est.)", "train collectives",
                   "infer collectives", "compile s")


def summary_row(rec: dict[str, Any]) -> list[str]:
  """One line of a multi-target table (``benchmarks/aot_table.py``) from a record."""
  tr, inf = rec["train"], rec["inference"]
  mem = tr["memory_bytes"]
  fit = "fits" if tr["fits"] else f"OVER +{_gib(tr['over_by_bytes'])}"
  coll = lambda p: ", ".join(f"{k} {v}" for k, v in p["collectives"].items() if v) or "none"  # noqa: E731
  return [rec["target"], rec["tokenizer"], rec["precision"], "on" if rec["remat_decoder"] else "off",
          str(rec["per_device_batch"]), f"{_gib(mem.get('peak'))} / {_gib(tr['hbm_bytes'])} {fit}",
          _num(tr["flops_per_device"] and tr["flops_per_device"] / 1e9, ".0f"),
          _num(tr["bytes_accessed_per_device"] and tr["bytes_accessed_per_device"] / 1e9, ".1f"),
          _num(tr["xla_estimate_s"] and tr["xla_estimate_s"] * 1e3, ".0f"),
          _num(tr["roofline_s"] and tr["roofline_s"] * 1e3, ".1f") + f" ({tr['bound']})",
          _num(tr["images_per_s_per_chip"], ".0f"), _pct(tr["mfu_bound"]),
          _num(inf["images_per_s_per_chip"], ".0f"), coll(tr), coll(inf),
          f"{tr['compile_s']:.0f} + {inf['compile_s']:.0f}"]


# ----------------------------------------------------------------------------- entry point

_FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. "
                                          "configs/gms.py:busi", flag_values=_FLAGS,
                                          lock_config=True)
_TARGET = flags.DEFINE_string("target", None, "One of: " + ", ".join(TARGETS), flag_values=_FLAGS)
_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice data parallel)",
                               flag_values=_FLAGS)
_INF_BATCH = flags.DEFINE_integer("inference_batch", 64, "Inference images per device",
                                  flag_values=_FLAGS)
_JSON = flags.DEFINE_string("json", "", "Write the record as JSON here", flag_values=_FLAGS)
USAGE = ("usage: gms-jax compile --config configs/gms.py:NAME --target TARGET [--num-slices N] "
         "[--inference-batch 64] [--json OUT] [--config.key=value ...]")


def main(argv: list[str] | None = None) -> int:
  """Errors are raised (:class:`gms_jax.errors.GmsError` where they are the user's to fix);
  ``gms_jax.cli`` prints them as one line (exit 2: usage/config, 1: e.g. compiler missing)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help", "-help") for a in argv):
    print(f"{USAGE}\n\nTARGET: {', '.join(TARGETS)}\n\n{__doc__.split(chr(10) * 2, 2)[2]}")
    return 0
  argv = [a.replace("--num-slices", "--num_slices").replace("--inference-batch",
                                                            "--inference_batch") for a in argv]
  try:
    extra = _FLAGS(["gms-jax compile"] + argv)
  except Exception as e:  # pylint: disable=broad-except  (absl/ml_collections raise many types)
    raise errors.UsageError(f"bad flag: {errors.one_line(e)}; {USAGE}") from None
  if len(extra) > 1:
    raise errors.UsageError(f"unexpected arguments {extra[1:]}; {USAGE}")
  if _CONFIG.value is None or not _TARGET.value:
    raise errors.UsageError(f"--config and --target are required; {USAGE}")
  if _TARGET.value not in TARGETS:
    raise errors.UsageError(f"unknown target {_TARGET.value!r}; one of {', '.join(TARGETS)}")
  config = _CONFIG.value
  configuration.validate(config, check_tokenizer=False)  # weights are not needed to compile
  if _JSON.value:
    _check_json_out(_JSON.value)
  rec = compile_for(config, _TARGET.value, num_slices=_SLICES.value,
                    inference_batch=_INF_BATCH.value,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
  print(format_table(rec))
  if _JSON.value:
    out = os.path.abspath(_JSON.value)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({WRITTEN_BY: True, **rec}, f, indent=1)
    os.replace(tmp, out)
  return 0


WRITTEN_BY = "gms_jax_compile_record"


def _check_json_out(path: str) -> None:
  """``--json OUT`` replaces only an earlier ``gms-jax compile`` record, never another file."""
  if os.path.isdir(path):
    raise errors.OutputError(f"--json {path}: is a folder")
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      ours = json.load(f).get(WRITTEN_BY) is True
  except (OSError, ValueError, AttributeError):
    ours = False
  if not ours:
    raise errors.OutputError(f"--json {path}: exists and is not a gms-jax compile record; "
                             "refusing to replace it")


if __name__ == "__main__":
  from gms_jax import cli  # pylint: disable=import-outside-toplevel
  sys.exit(cli.main(["compile"] + sys.argv[1:]))
