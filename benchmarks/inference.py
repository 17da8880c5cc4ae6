#!/usr/bin/env python
"""Inference benchmark: images/s for encode -> map -> decode, gms_jax vs PyTorch.

The METHOD §4 prediction on the same weights and images: encode (no noise), mapper ``"out"`` head,
decode to a grey mask, threshold ``> 0.5``.  JAX runs the trainer's inference function (``gms_jax.step.build``, batch-sharded over this host's
devices; AOT-compiled per batch size, compile time reported separately); PyTorch runs diffusers
``AutoencoderKL`` / the TAE reference and the reference mapper under ``torch.inference_mode``.

For each framework and tokenizer, a worker subprocess sweeps the batch sizes (``--batches``) and
reports images/s at each; the table shows batch 1 and the best batch.

Examples::

    python benchmarks/inference.py                         # both tokenizers, 224², batches 1..16
    python benchmarks/inference.py --tokenizer taef2 --batches 1,8,32
    python benchmarks/inference.py --quick                 # CI smoke
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C
import _jax_side as J
import _torch_side as T
import _weights as W

NAME = "inference"


def jax_worker(job):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from gms_jax import inference, parallel
  from gms_jax import step as step_lib

  tok, _, params = J.jax_load(job["spec"])
  config = J.product_config(size=job["size"], dtype=job["dtype"])
  # The trainer's inference function (gms_jax.step.build): batch-sharded in and out.
  built = step_lib.build(config, parallel.make_mesh(), tokenizer=tok)
  params = jax.device_put(nnx.to_pure_dict(params), built.state_sharding["params"])
  tok_params = jax.device_put(tok.params, built.tok_sharding)
  out = {
    "backend": J.jax_backend(),
    "impl": "gms_jax.step.build(...).predict",
    "rss_after_setup_bytes": C.rss_bytes(),
    "per_batch": [],
  }
  peak = 0
  for b in job["batches"]:
    images, _ = C.make_batch(b, job["size"], job["seed"])
    x = jax.device_put(images, built.data_sharding)
    t0 = time.perf_counter()
    compiled = built.predict.lower(
      built.abstract_state["params"], built.abstract_tok_params, built.images_shape(b)
    ).compile()
    compile_s = time.perf_counter() - t0
    run = lambda: compiled(params, tok_params, x) > inference.THRESHOLD
    times, pk, masks = C.timed(run, job["repeats"], job["warmup"], jax.block_until_ready)
    peak = max(peak, pk)
    st = C.stats(times)
    out["per_batch"].append(
      {
        "batch": b,
        "compile_s": compile_s,
        "flops": J.cost_flops(compiled),
        **st,
        "times_s": times,
        "images_per_s": b / st["median_s"],
        "mask_fraction": float(jnp.mean(masks)),
      }
    )
  return C.finish_record(out, peak, J.jax_memory_stats())


def torch_worker(job):
  w = T.torch_worker_setup(job)
  torch, dev, family, encode, decode_raw, mapper = w[:6]
  mapper.eval()
  bf16 = job["dtype"] == "bfloat16"
  out = dict(w.rec, per_batch=[])

  @torch.inference_mode()
  def predict(x):
    with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
      z, _ = encode(x)
      return T.torch_decode_mask(family, decode_raw, mapper(z.float())["out"].float()) > 0.5

  peak = 0
  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  for b in job["batches"]:
    images, _ = C.make_batch(b, job["size"], job["seed"])
    x = T.torch_images(images, dev)
    times, pk, masks = C.timed(
      lambda: predict(x), job["repeats"], job["warmup"], lambda o: (T.torch_sync(dev), o)[1]
    )
    peak = max(peak, pk)
    st = C.stats(times)
    out["per_batch"].append(
      {
        "batch": b,
        **st,
        "times_s": times,
        "images_per_s": b / st["median_s"],
        "mask_fraction": float(masks.float().mean()),
      }
    )
  return C.finish_record(out, peak, T.torch_memory_stats(dev))


def main(argv=None):
  p = C.base_parser(__doc__.split("\n\n")[0])
  p.add_argument("--batches", default="1,2,4,8,16", help="comma-separated batch sizes to sweep")
  p.add_argument("--timeout", type=float, default=3600, help="per-worker timeout (s)")
  args = p.parse_args(argv)
  if args.worker:
    return C.worker_main(args, jax_worker, torch_worker)
  if args.repeats == p.get_default("repeats"):
    args.repeats = 3  # a sweep: fewer repeats per point than the train step
  C.apply_quick(args)
  batches = [int(b) for b in args.batches.split(",") if b.strip()]

  machine = C.machine_info()
  cache, tmp = C.cache_dir(args)
  toks = C.tokenizer_list(args)
  print(
    f"# {NAME}: {args.size}², batches {batches}, {args.dtype}, repeats {args.repeats}, warmup "
    f"{args.warmup}; {machine['cpu']} ({machine['cpu_count']} cores), commit "
    f"{machine['commit'][:10]}{' (dirty)' if machine['dirty'] else ''}"
  )
  print("# preparing shared weights ...", flush=True)
  specs = W.prepare_weights(args, cache, toks)
  records = []
  for tname in toks:
    for fw in C.framework_list(args):
      job = {
        "framework": fw,
        "tokenizer": tname,
        "variant": "predict",
        "batches": batches,
        "batch": None,
        "size": args.size,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "threads": args.threads,
        "quick": args.quick,
        "spec": dict(specs[tname], dtype=args.dtype),
      }
      print(f"# running {fw} / {tname} ...", flush=True)
      rec = C.run_worker(os.path.abspath(__file__), job, timeout_s=args.timeout)
      if "error" in rec:
        print(f"#   FAILED: {rec['error']}", flush=True)
      else:
        print(
          "#   "
          + ", ".join(f"b{r['batch']}: {r['images_per_s']:.3g} img/s" for r in rec["per_batch"]),
          flush=True,
        )
      records.append(rec)
  if tmp is not None:
    tmp.cleanup()

  for r in records:
    pb = r.get("per_batch") or []
    if pb:
      r["batch1"] = next((x for x in pb if x["batch"] == 1), None)
      r["best"] = max(pb, key=lambda x: x["images_per_s"])
  by = {(r["framework"], r["tokenizer"]): r for r in records}
  for r in records:
    t = by.get(("torch", r["tokenizer"]))
    if r["framework"] == "jax" and t and r.get("best") and t.get("best"):
      r["speedup_best_vs_torch_best"] = r["best"]["images_per_s"] / t["best"]["images_per_s"]
      if r.get("batch1") and t.get("batch1"):
        r["speedup_batch1_vs_torch"] = r["batch1"]["images_per_s"] / t["batch1"]["images_per_s"]

  headers = [
    "tokenizer",
    "framework",
    "size",
    "img/s @ b1",
    "b1 median s",
    "best batch",
    "img/s @ best",
    "compile s @ best",
    "JAX speed-up b1",
    "JAX speed-up best",
    "peak RSS GiB",
    "device peak GiB",
  ]
  rows = []
  for r in records:
    if "error" in r:
      rows.append([r["tokenizer"], r["framework"], args.size, "FAILED"] + ["-"] * 8)
      continue
    b1, best = r.get("batch1") or {}, r["best"]
    dm = (r.get("device_memory") or {}).get("peak_bytes_in_use")
    rows.append(
      [
        r["tokenizer"],
        r["framework"],
        f"{args.size}²",
        C.fmt(b1.get("images_per_s"), ".3g"),
        C.fmt(b1.get("median_s"), ".3f"),
        best["batch"],
        C.fmt(best["images_per_s"], ".3g"),
        C.fmt(best.get("compile_s"), ".1f"),
        C.fmt(r.get("speedup_batch1_vs_torch"), ".2f")
        + ("x" if r.get("speedup_batch1_vs_torch") else ""),
        C.fmt(r.get("speedup_best_vs_torch_best"), ".2f")
        + ("x" if r.get("speedup_best_vs_torch_best") else ""),
        C.fmt(C.gib(r.get("step_peak_rss_bytes")), ".2f"),
        C.fmt(C.gib(dm), ".2f"),
      ]
    )
  print()
  table = C.print_table(headers, rows)
  sweep_rows = [
    [
      r["tokenizer"],
      r["framework"],
      x["batch"],
      C.fmt(x["median_s"], ".3f"),
      C.fmt(x["iqr_s"], ".3f"),
      C.fmt(x["images_per_s"], ".3g"),
    ]
    for r in records
    if "error" not in r
    for x in r["per_batch"]
  ]
  print()
  sweep = C.print_table(
    ["tokenizer", "framework", "batch", "median s", "IQR s", "img/s"], sweep_rows
  )
  print("\nJAX speed-up = JAX img/s / PyTorch img/s (batch 1; and best batch of each framework).")
  C.write_results(
    C.results_path(args, NAME),
    {
      "benchmark": NAME,
      "machine": machine,
      "args": {k: v for k, v in vars(args).items() if k != "worker"},
      "records": records,
      "table_markdown": table,
      "sweep_markdown": sweep,
    },
  )
  return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
  sys.exit(main())
