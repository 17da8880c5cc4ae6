#!/usr/bin/env python
"""Training step benchmark: gms_jax's jitted step vs the same model and loss in PyTorch.

Both sides run the METHOD §3 step on the same weights and the same batch: encode image and mask with
the frozen tokenizer (no gradient), latent noise with p=0.5 (SD-VAE: unscaled posterior std), the
mapper, Σ MSE + Σ Dice(decode_mask(head)) over the heads level2/level1/out with gradients through
the frozen decoder (input gradients only), and an AdamW update (lr 2e-3, wd 0.01).

* JAX: the trainer's own step (``gms_jax.step.build``: the same sharded, donated program
  ``gms-jax train`` compiles, on a mesh of this host's devices) with the trainer's schedule,
  optimizer and loss settings; AOT-compiled, compile time reported separately; FLOPs per step from
  XLA's cost analysis.
* PyTorch: diffusers ``AutoencoderKL`` (SD-VAE) or the TAE reference (``gms_jax/testing/torch_refs.py``),
  the reference mapper, ``torch.optim.AdamW``; heads decoded one by one as the original does.

Every (framework, tokenizer, remat) variant runs in its own subprocess, so the reported peak RSS
(sampled during the timed steps) belongs to that variant alone.  "remat" = the decoder's
activations are recomputed in the backward pass (``jax.checkpoint`` / ``torch.utils.checkpoint``).

Examples::

    python benchmarks/train_step.py                                   # both tokenizers, 8 x 224²
    python benchmarks/train_step.py --tokenizer taef2 --repeats 10
    python benchmarks/train_step.py --tokenizer taef2 --remat off --rounds 2   # jax,torch,torch,jax
    python benchmarks/train_step.py --tokenizer sd-vae --batch 2 --remat off
    python benchmarks/train_step.py --quick                           # CI smoke (seconds)
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

HEADS = ("level2", "level1", "out")
NAME = "train_step"


# ============================================================================ JAX worker


def _product_config(job):
  """The trainer's default config (METHOD §3 numbers) at the job's size, batch and settings."""
  config = J.product_config(size=job["size"], dtype=job["dtype"])
  config.batch_size = job["batch"]
  config.loss.batch_decode = job["batch_decode"]
  config.loss.batch_encode = job.get("batch_encode", "auto")
  return config


def jax_worker(job):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from gms_jax import loss as gloss
  from gms_jax import parallel
  from gms_jax import step as step_lib

  spec = job["spec"]
  tok, graphdef, params = J.jax_load(spec, remat=job["remat"])
  images, masks = C.make_batch(job["batch"], job["size"], job["seed"])
  rec = {"rss_after_setup_bytes": C.rss_bytes(), "backend": J.jax_backend()}

  if job["check"] and not job.get(
    "compile_only"
  ):  # the noise-free loss at the initial params, for the cross-framework check
    n = min(2, job["batch"])
    f = jax.jit(
      lambda p, tp, x, m: gloss.gms_loss(
        graphdef, p, tok, tp, x, m, apply_noise=False, eps=None, heads=HEADS
      )[0]
    )
    rec["check_loss"] = float(
      f(params, tok.params, jnp.asarray(images[:n]), jnp.asarray(masks[:n]))
    )
    del f

  # The trainer's step, built by the trainer's builder on a mesh of this host's devices, with the
  # benchmark's (shared, converted) mapper weights as the initial state.
  config = _product_config(job)
  built = step_lib.build(config, parallel.make_mesh(), tokenizer=tok, steps_per_epoch=100)
  pure = nnx.to_pure_dict(params)
  state = jax.device_put(
    {
      "step": jnp.zeros((), jnp.int32),
      "params": pure,
      "opt_state": built.tx.init(pure),
      "rng": jax.random.PRNGKey(int(config.seed)),
    },
    built.state_sharding,
  )
  tok_params = jax.device_put(tok.params, built.tok_sharding)
  batch = jax.device_put({"image": images, "mask": masks}, built.data_sharding)
  impl = (
    f"gms_jax.step.build on {built.n_devices} device(s) (batch_decode="
    f"{job['batch_decode']!r} -> {built.loss_kw['batch_decode']}, batch_encode="
    f"{job.get('batch_encode', 'auto')!r} -> {built.loss_kw['batch_encode']})"
  )
  t0 = time.perf_counter()
  lowered = built.lower_train()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  rec.update(
    impl=impl,
    lower_s=t1 - t0,
    compile_s=t2 - t1,
    flops=J.cost_flops(compiled),
    xla_memory=J.memory_analysis(compiled),
    rss_after_compile_bytes=C.rss_bytes(),
  )
  if job.get("compile_only"):
    rec.update(ru_maxrss_bytes=C.peak_rss_bytes(), device_memory=J.jax_memory_stats())
    return rec
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], tok_params, batch)
    return metrics["loss"]

  times, peak, loss = C.timed(run, job["repeats"], job["warmup"], jax.block_until_ready)
  rec.update(C.stats(times), times_s=times, last_loss=float(loss))
  return C.finish_record(rec, peak, J.jax_memory_stats())


# ============================================================================ PyTorch worker


def torch_worker(job):
  w = T.torch_worker_setup(job)
  torch, dev, family, encode, decode_raw, mapper = w[:6]
  import torch.nn.functional as F
  from torch.utils.checkpoint import checkpoint

  images, masks = C.make_batch(job["batch"], job["size"], job["seed"])
  x = T.torch_images(images, dev)
  grey = torch.from_numpy(masks).to(dev)
  m3 = grey[:, None].expand(-1, 3, -1, -1).contiguous()
  opt = torch.optim.AdamW(
    mapper.parameters(), lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01
  )
  bf16 = job["dtype"] == "bfloat16"
  gen = torch.Generator(device=dev).manual_seed(job["seed"])
  rec = dict(w.rec)

  def decode_mask(z):
    if job["remat"]:
      return checkpoint(
        lambda t: T.torch_decode_mask(family, decode_raw, t), z, use_reentrant=False
      )
    return T.torch_decode_mask(family, decode_raw, z)

  def loss_fn(xb, greyb, m3b, noise: bool):
    with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
      z_img, std = encode(xb)
      z_mask, _ = encode(m3b)
      z_img, z_mask, std = z_img.float(), z_mask.float(), std.float()
      if noise and torch.rand((), generator=gen, device=dev).item() < 0.5:
        z_img = z_img + std * torch.randn(z_img.shape, generator=gen, device=dev)
    with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
      out = mapper(z_img)
      preds = [out[k].float() for k in HEADS]
      rec_loss = sum(F.mse_loss(p, z_mask) for p in preds)
      dice = sum(T.torch_dice(decode_mask(p), greyb) for p in preds)  # one decode per head
    return rec_loss + dice

  if job["check"]:
    n = min(2, job["batch"])
    with torch.no_grad():
      rec["check_loss"] = float(loss_fn(x[:n], grey[:n], m3[:n], noise=False))

  def run():
    loss = loss_fn(x, grey, m3, noise=True)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  times, peak, loss = C.timed(
    run, job["repeats"], job["warmup"], lambda o: (T.torch_sync(dev), o)[1]
  )
  rec.update(C.stats(times), times_s=times, last_loss=float(loss.detach()))
  return C.finish_record(rec, peak, T.torch_memory_stats(dev))


# ============================================================================ driver


def _mfu(rec, model_flops, peak):
  if not (model_flops and rec.get("median_s")):
    return None, None
  achieved = model_flops / rec["median_s"]
  return achieved, (achieved / peak if peak else None)


def _peak_for(rec, machine, dtype):
  be = rec.get("backend") or {}
  if be.get("platform") == "gpu" or str(rec.get("device", "")).startswith("cuda"):
    return J.peak_flops(be.get("device_kind", ""), dtype)
  return (machine.get("cpu_peak_estimate") or {}).get("peak_flops")


def main(argv=None):
  p = C.base_parser(__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument(
    "--remat",
    choices=("off", "on", "both"),
    default=None,
    help="decoder rematerialisation variants to run (default: both; --quick: off)",
  )
  p.add_argument(
    "--batch-decode",
    choices=("auto", "true", "false"),
    default="auto",
    help="JAX: config.loss.batch_decode (auto: one decoder call for the three heads "
    "on GPU/TPU, one call per head on CPU)",
  )
  p.add_argument(
    "--batch-encode",
    choices=("auto", "true", "false"),
    default="auto",
    help="JAX: config.loss.batch_encode (auto: images and masks in one encoder call "
    "on GPU/TPU, two calls on CPU)",
  )
  p.add_argument(
    "--no-check",
    action="store_true",
    help="skip the cross-framework loss check (noise-free loss on 2 samples)",
  )
  p.add_argument(
    "--compile-only",
    action="store_true",
    help="JAX only: compile the step and report compile time, FLOPs and XLA's memory "
    "analysis without running it (e.g. SD-VAE at batch 8 on a small CPU)",
  )
  p.add_argument(
    "--rounds",
    type=int,
    default=1,
    help="run each variant's worker this many times, reversing the framework order "
    "every other round, and pool the timed repeats: ratios that survive the "
    "machine's speed drifting between workers",
  )
  p.add_argument("--timeout", type=float, default=3600, help="per-variant worker timeout (s)")
  args = p.parse_args(argv)
  if args.worker:
    return C.worker_main(args, jax_worker, torch_worker)
  C.apply_quick(args)
  if args.compile_only:
    args.frameworks = "jax"

  machine = C.machine_info()
  cache, tmp = C.cache_dir(args)
  toks = C.tokenizer_list(args)
  print(
    f"# {NAME}: batch {args.batch} x {args.size}², {args.dtype}, repeats {args.repeats}, "
    f"warmup {args.warmup}; {machine['cpu']} ({machine['cpu_count']} cores), "
    f"commit {machine['commit'][:10]}{' (dirty)' if machine['dirty'] else ''}"
  )
  print("# preparing shared weights ...", flush=True)
  specs = W.prepare_weights(args, cache, toks)
  remats = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
  records = []
  for tname in toks:
    spec = dict(specs[tname], dtype=args.dtype)
    for remat in remats:
      per_fw: dict[str, list] = {}
      for rnd in range(max(1, args.rounds)):
        fws = C.framework_list(args)
        for fw in fws[::-1] if rnd % 2 else fws:
          job = {
            "framework": fw,
            "tokenizer": tname,
            "variant": "remat" if remat else "no-remat",
            "remat": remat,
            "batch": args.batch,
            "size": args.size,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
            "threads": args.threads,
            "quick": args.quick,
            "check": not args.no_check,
            "compile_only": args.compile_only,
            "batch_decode": args.batch_decode,
            "batch_encode": args.batch_encode,
            "spec": spec,
          }
          rnd_s = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
          print(f"# running {fw} / {tname} / {job['variant']}{rnd_s} ...", flush=True)
          rec = C.run_worker(os.path.abspath(__file__), job, timeout_s=args.timeout)
          if "error" in rec:
            print(f"#   FAILED: {rec['error']}", flush=True)
          else:
            print(
              f"#   median {C.fmt(rec.get('median_s'), '.3f')} s  "
              f"(compile {C.fmt(rec.get('compile_s'), '.1f')} s)",
              flush=True,
            )
          per_fw.setdefault(fw, []).append(rec)
      for fw in C.framework_list(args):
        records.append(C.pool_rounds(per_fw[fw]))
  if tmp is not None:
    tmp.cleanup()

  # ---- derived numbers: speed-up vs PyTorch (same tokenizer and remat), model FLOPs, MFU
  by = {(r["framework"], r["tokenizer"], r["variant"]): r for r in records}
  for r in records:
    torch_rec = by.get(("torch", r["tokenizer"], r["variant"]))
    if r["framework"] == "jax" and torch_rec and r.get("median_s") and torch_rec.get("median_s"):
      r["speedup_vs_torch"] = torch_rec["median_s"] / r["median_s"]
      r["time_ratio_jax_over_torch"] = r["median_s"] / torch_rec["median_s"]
    if r.get("check_loss") is not None and torch_rec and torch_rec.get("check_loss") is not None:
      a, b = r["check_loss"], torch_rec["check_loss"]
      r["check_loss_rel_diff"] = abs(a - b) / max(abs(b), 1e-12)
    # FLOPs of the JAX program (XLA cost analysis, without remat). PyTorch runs a different
    # program (it materialises the upsampled tensors, so it does more FLOPs): no FLOP/s for it.
    base = by.get(("jax", r["tokenizer"], "no-remat")) or by.get(("jax", r["tokenizer"], "remat"))
    r["model_flops"] = base.get("flops") if base and r["framework"] == "jax" else None
    if r.get("median_s"):
      r["images_per_s"] = r["batch"] / r["median_s"]
    r["achieved_flops"], r["mfu"] = _mfu(r, r["model_flops"], _peak_for(r, machine, args.dtype))

  headers = [
    "tokenizer",
    "framework",
    "remat",
    "batch",
    "compile s",
    "median s",
    "min s",
    "max s",
    "IQR s",
    "img/s",
    "JAX speed-up",
    "step peak RSS GiB",
    "XLA temp GiB",
    "device peak GiB",
    "GFLOP/step",
    "GFLOP/s",
    "MFU",
    "loss check rel",
  ]
  rows = []
  for r in records:
    if "error" in r:
      rows.append([r["tokenizer"], r["framework"], r["variant"], r["batch"], "FAILED"] + ["-"] * 13)
      continue
    dm = (r.get("device_memory") or {}).get("peak_bytes_in_use")
    rows.append(
      [
        r["tokenizer"],
        r["framework"],
        r["variant"],
        f"{r['batch']}x{r['size']}²",
        C.fmt(r.get("compile_s"), ".1f"),
        C.fmt(r.get("median_s"), ".3f"),
        C.fmt(r.get("min_s"), ".3f"),
        C.fmt(r.get("max_s"), ".3f"),
        C.fmt(r.get("iqr_s"), ".3f"),
        C.fmt(r.get("images_per_s"), ".3g"),
        C.fmt(r.get("speedup_vs_torch"), ".2f") + ("x" if r.get("speedup_vs_torch") else ""),
        C.fmt(C.gib(r.get("step_peak_rss_bytes")), ".2f"),
        C.fmt(C.gib((r.get("xla_memory") or {}).get("temp_size_in_bytes")), ".2f"),
        C.fmt(C.gib(dm), ".2f"),
        C.fmt(r["model_flops"] / 1e9 if r.get("model_flops") else None, ".1f"),
        C.fmt(r["achieved_flops"] / 1e9 if r.get("achieved_flops") else None, ".1f"),
        C.fmt(100 * r["mfu"] if r.get("mfu") else None, ".1f") + ("%" if r.get("mfu") else ""),
        C.fmt(r.get("check_loss_rel_diff"), ".1e"),
      ]
    )
  print()
  table = C.print_table(headers, rows)
  print(
    "\nJAX speed-up = PyTorch median / JAX median (same tokenizer, same remat). Step peak RSS "
    "= highest resident memory of the variant's process sampled during the timed steps; XLA "
    "temp = XLA's buffer assignment for the step's scratch (activations etc.). GFLOP/step = "
    "XLA cost analysis of the JAX step without remat (JAX rows only: PyTorch runs a different "
    "program); MFU against "
    + (
      "the GPU's dense peak"
      if any((r.get("backend") or {}).get("platform") == "gpu" for r in records)
      else "an estimated CPU fp32 peak"
    )
    + "."
  )
  C.write_results(
    C.results_path(args, NAME),
    {
      "benchmark": NAME,
      "machine": machine,
      "args": {k: v for k, v in vars(args).items() if k != "worker"},
      "records": records,
      "table_markdown": table,
    },
  )
  return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
  sys.exit(main())
