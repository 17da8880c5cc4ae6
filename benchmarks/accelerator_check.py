"""Measured vs estimated, on a machine with a GPU or TPU: the exact and banked train steps at the
``accel`` settings, and the bank encoder.

    python benchmarks/accelerator_check.py --out accel_check.json            # taef2 (packaged)
    python benchmarks/accelerator_check.py --tokenizer sd-vae --out sd.json  # random SD-VAE weights

For each program the trainer runs (built by ``gms_jax.step.build``, the one builder: ``exact``
from ``busi,taef2,accel``; ``phase1``, ``phase2`` and the bank encoder from
``busi,taef2,fast,accel``) on all local devices, at the config's global batch: it compiles the
program, runs ``--warmup`` steps, then times ``--steps`` steps back to back (one sync at the end:
the trainer also keeps the device busy), and records

* step time, images/s per chip, peak device memory (the allocator's high-water mark since the
  start of the process, plus XLA's own buffer assignment of the program);
* achieved FLOP/s and MFU against the chip's dense peak at the compute dtype, and achieved bytes/s
  against its HBM bandwidth (the banked phase-1 step is memory-bound: bytes matter);
* next to them, the compile-time estimate for the same chip: XLA's cost analysis of the very
  compiled program, the roofline bound ``max(FLOPs / peak, bytes / bandwidth)`` and the images/s
  and MFU it implies (``gms_jax.aot.program_facts``, what ``gms-jax compile`` prints).

Speed does not depend on the weights' values, so ``--tokenizer sd-vae`` (no weights ship here)
uses random ones; ``taef2`` uses the packaged weights. Batches are random of the right shapes. On a
CPU (``--quick``: the smoke config, 2 steps) it runs as a smoke test; its numbers mean nothing.
Writes one JSON record (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_config(arg: str):
  spec = importlib.util.spec_from_file_location("gms_check_config", REPO / "configs" / "gms.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _chip(device) -> str | None:
  """The ``gms_jax.aot.CHIPS`` key of a device, or None (CPU / unknown)."""
  kind = str(device.device_kind).lower()
  for key, needle in (
    ("h200", "h200"),
    ("h100", "h100"),
    ("a100", "a100"),
    ("v5e", "v5 lite"),
    ("v5e", "v5e"),
    ("v5p", "v5p"),
    ("v6e", "v6"),
    ("v4", "tpu v4"),
  ):
    if needle in kind:
      return key
  return None


def _tokenizer(name: str, config):
  import jax
  import numpy as np

  from gms_jax import tokenizers

  if name == "taef2":
    return tokenizers.from_config(config)  # the packaged weights
  tok = tokenizers.abstract_from_config(config)  # random weights: speed does not depend on them
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), tok.params)
  return tokenizers.with_params(tok, params)


def _random_batch(shapes: dict, seed: int):
  import jax
  import numpy as np

  rng = np.random.default_rng(seed)
  out = {}
  for k, s in shapes.items():
    x = rng.random(s.shape, dtype=np.float32)
    if k == "mask":
      x = (x > 0.5).astype(np.float32)
    elif k.startswith("z_"):
      x = (x - 0.5) * 4
    out[k] = jax.device_put(x, s.sharding)
  return out


def _peak_bytes(devices) -> int | None:
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats() or {}
    except Exception:  # CPU and some plugins have none
      stats = {}
    if "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def _time(fn, steps: int, warmup: int):
  """Seconds per call: ``warmup`` calls, then ``steps`` calls back to back, one sync at the end."""
  import jax

  out = None
  for _ in range(warmup):
    out = fn()
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / max(steps, 1), out


def lowered_flops(
  config_arg: str,
  tokenizer: str,
  program: str,
  per_device_batch: int,
  *,
  platform: str,
  image_size: int = 0,
) -> float | None:
  """FLOPs of one device's share of ``program``: XLA's cost analysis of the program lowered (not
  compiled) for one host CPU device at the per-device batch, with ``"auto"`` settings resolved
  for ``platform``. The unoptimized HLO counts convolutions as FLOPs; the cost analysis of a
  GPU-compiled program does not (cuDNN custom calls count 0), which made MFU read ~0."""
  import jax

  from gms_jax import aot, parallel, tokenizers
  from gms_jax import step as step_lib

  config = _load_config(config_arg)
  config.tokenizer.name = tokenizer
  if image_size:
    config.data.image_size = image_size
  config.per_device_batch_size = 0
  config.bank.encode_batch_size = per_device_batch
  built = step_lib.build(
    config,
    parallel.make_mesh(jax.devices("cpu")[:1]),
    tokenizer=tokenizers.abstract_from_config(config),
    global_batch=per_device_batch,
    platform=platform,
    steps_per_epoch=100,
  )
  lowered = (
    built.lower_bank_encode(per_device_batch)
    if program == "bank_encode"
    else built.lower_train(program)
  )
  return aot.cost_of(lowered).get("flops")


def _with_mfu(rec: dict, flops: float | None) -> dict:
  """Fills the measured MFU / FLOP/s of a record from per-device ``flops`` (lowered HLO)."""
  from gms_jax import aot

  m = rec["measured"]
  chip = aot.CHIPS.get(rec.get("chip") or "")
  m["flops_per_device_lowered"] = flops
  m["flops_per_s_per_chip"] = flops / m["step_s"] if flops else None
  m["mfu"] = flops / m["step_s"] / chip.peak_flops[rec["precision"]] if flops and chip else None
  # What `gms-jax compile` estimates for a GPU target: the compute-bound time of these FLOPs.
  rec["estimate"]["compute_bound_images_per_s_per_chip"] = (
    rec["per_device_batch"] / (flops / chip.peak_flops[rec["precision"]])
    if flops and chip
    else None
  )
  return rec


def measure(
  config_arg: str,
  tokenizer: str,
  *,
  steps: int,
  warmup: int,
  image_size: int = 0,
  per_device_batch: int = 0,
  log=print,
) -> list[dict]:
  import jax

  from gms_jax import aot, parallel
  from gms_jax import step as step_lib

  config = _load_config(config_arg)
  config.tokenizer.name = tokenizer
  if image_size:
    config.data.image_size = image_size
  if per_device_batch:
    config.per_device_batch_size = per_device_batch
    config.bank.encode_batch_size = per_device_batch
  devices = jax.devices()
  mesh = parallel.make_mesh(devices)
  n = len(devices)
  chip_key = _chip(devices[0])
  chip = aot.CHIPS.get(chip_key) if chip_key else None
  dtype_name = str(config.precision)
  tok = _tokenizer(tokenizer, config)
  built = step_lib.build(config, mesh, tokenizer=tok, steps_per_epoch=100)
  tok_params = jax.tree.map(lambda x: parallel.replicate_array(x, mesh), tok.params)
  programs = [(name, built.global_batch_size) for name in built.step_names]
  if built.recipe == "fast":
    programs.append(("bank_encode", int(config.bank.encode_batch_size) * n))
  records = []
  for name, images in programs:
    t0 = time.perf_counter()
    if name == "bank_encode":
      compiled = built.lower_bank_encode(images).compile()
      shapes = {
        "image": built.images_shape(images),
        "mask": jax.ShapeDtypeStruct(
          built.images_shape(images).shape[:3],
          built.images_shape(images).dtype,
          sharding=built.data_sharding,
        ),
      }
      batch = _random_batch(shapes, 0)

      def fn(compiled=compiled, batch=batch):
        return compiled(tok_params, batch["image"], batch["mask"])
    else:
      compiled = built.lower_train(name).compile()
      batch = _random_batch(built.batch_shapes[name], 0)
      holder = {"state": built.init()}

      def fn(compiled=compiled, batch=batch, holder=holder):
        holder["state"], m = compiled(holder["state"], tok_params, batch)
        return m

    compile_s = time.perf_counter() - t0
    step_s, out = _time(fn, steps, warmup)
    est = (
      aot.program_facts(
        compiled, images=images, chip=chip, dtype_name=dtype_name, n_devices=n, compile_s=compile_s
      )
      if chip
      else {
        "flops_per_device": aot.cost_of(compiled).get("flops"),
        "bytes_accessed_per_device": aot.cost_of(compiled).get("bytes accessed"),
      }
    )
    nbytes = est.get("bytes_accessed_per_device")
    rec = {
      "config": config_arg,
      "tokenizer": tokenizer,
      "program": name,
      "recipe": built.recipe,
      "image_size": built.image_size,
      "precision": dtype_name,
      "devices": n,
      "device_kind": str(devices[0].device_kind),
      "chip": chip_key,
      "global_batch": images,
      "per_device_batch": images // n,
      "peak_lr": built.peak_lr,
      "compile_s": compile_s,
      "steps_timed": steps,
      "warmup": warmup,
      "measured": {
        "step_s": step_s,
        "images_per_s": images / step_s,
        "images_per_s_per_chip": images / step_s / n,
        "peak_device_bytes_so_far": _peak_bytes(devices),
        "bytes_per_s_per_chip": nbytes / step_s if nbytes else None,
        "hbm_bandwidth_fraction": (
          nbytes / step_s / chip.hbm_bytes_per_s if nbytes and chip else None
        ),
      },
      "estimate": est,
    }
    _with_mfu(
      rec,
      lowered_flops(
        config_arg, tokenizer, name, images // n, platform=built.platform, image_size=image_size
      ),
    )
    if name != "bank_encode":
      rec["measured"]["last_loss"] = float(jax.device_get(out["loss"]))
    m = rec["measured"]
    log(
      f"{config_arg} [{tokenizer}] {name}: {step_s * 1e3:.2f} ms/step, "
      f"{m['images_per_s_per_chip']:.0f} img/s/chip, MFU {m['mfu']}, compile {compile_s:.1f}s"
    )
    records.append(rec)
  return records


def table(records: list[dict]) -> str:
  def f(x, spec):
    return "-" if x is None else format(x, spec)

  head = (
    "| config | program | batch/chip | ms/step | img/s/chip | est. img/s/chip (compute "
    "bound) | est. img/s/chip (compiled roofline) | MFU | GB/s/chip | HBM fraction | "
    "XLA peak GiB | compile s |"
  )
  lines = [head, "|" + "---|" * 12]
  for r in records:
    m, e = r["measured"], r["estimate"]
    mem = (e.get("memory_bytes") or {}).get("peak")
    lines.append(
      f"| {r['config']} [{r['tokenizer']}] | {r['program']} | {r['per_device_batch']} | "
      f"{f(m['step_s'] * 1e3, '.2f')} | {f(m['images_per_s_per_chip'], '.0f')} | "
      f"{f(e.get('compute_bound_images_per_s_per_chip'), '.0f')} | "
      f"{f(e.get('images_per_s_per_chip'), '.0f')} | {f(m['mfu'] and 100 * m['mfu'], '.1f')}% | "
      f"{f(m['bytes_per_s_per_chip'] and m['bytes_per_s_per_chip'] / 1e9, '.0f')} | "
      f"{f(m['hbm_bandwidth_fraction'], '.2f')} | {f(mem and mem / 2**30, '.2f')} | "
      f"{r['compile_s']:.1f} |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--configs",
    default="busi,taef2,accel;busi,taef2,fast,accel",
    help="';'-separated configs/gms.py names (the exact and the fast recipe)",
  )
  p.add_argument("--tokenizer", default="taef2", choices=["taef2", "sd-vae"])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--image-size", type=int, default=0, help="override data.image_size")
  p.add_argument(
    "--per-device-batch",
    type=int,
    default=0,
    help="override per_device_batch_size (and the bank's encode batch)",
  )
  p.add_argument("--quick", action="store_true", help="CPU smoke: the smoke config, 2 steps")
  p.add_argument("--commit", default=os.environ.get("GMS_COMMIT", ""))
  p.add_argument(
    "--recompute-mfu",
    default="",
    help="a record of this script: fill its MFU from lowered-HLO FLOPs (no device)",
  )
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  if args.recompute_mfu:
    payload = json.loads(Path(args.recompute_mfu).read_text())
    for rec in payload["records"]:
      _with_mfu(
        rec,
        lowered_flops(
          rec["config"],
          rec["tokenizer"],
          rec["program"],
          rec["per_device_batch"],
          platform="gpu",
          image_size=rec["image_size"],
        ),
      )
    payload["table_markdown"] = table(payload["records"])
    payload["mfu_recomputed"] = (
      "MFU from FLOPs of the lowered per-device HLO, computed on a CPU "
      "host after the run (the GPU-compiled cost analysis counts "
      "cuDNN convolutions as 0 FLOPs)"
    )
    Path(args.out).write_text(json.dumps(payload, indent=1))
    print(payload["table_markdown"])
    return 0
  if args.quick:
    args.configs, args.steps, args.warmup = "smoke;smoke,fast", 2, 1
  import jax

  records = []
  for arg in [a for a in args.configs.split(";") if a]:
    records += measure(
      arg,
      args.tokenizer,
      steps=args.steps,
      warmup=args.warmup,
      image_size=args.image_size,
      per_device_batch=args.per_device_batch,
      log=lambda s: print(s, flush=True),
    )
  payload = {
    "benchmark": "accelerator_check",
    "records": records,
    "machine": {
      "commit": args.commit,
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "python": platform.python_version(),
      "devices": [str(d.device_kind) for d in jax.devices()],
      "command": " ".join([Path(sys.argv[0]).name] + list(argv or sys.argv[1:])),
      "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    },
  }
  payload["table_markdown"] = table(records)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(payload, indent=1))
  print(payload["table_markdown"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
