#!/usr/bin/env python
"""What the latent bank buys: bank encode cost per view, banked step vs exact step (time, FLOPs).

In one process, on the same tokenizer, batch and image size:

* **encode**: ``gms_jax.recipes.make_encode_fn`` (what the bank build runs: image and mask of
  a view through the frozen encoder), seconds per view (augmentation and disk not included; the
  trainer logs the real build's s/view);
* **banked phase 1**: ``gms_jax.step.make_train_step(..., banked=True)`` with the latent term only (mapper
  forward/backward + AdamW; the tokenizer never runs);
* **banked phase 2**: the same with the decoder Dice term (3 heads decoded, backprop through the
  frozen decoder; no encoder);
* **exact**: ``gms_jax.step.make_train_step`` (docs/METHOD.md §3: encoder, mapper, decoder Dice).

Each step is AOT-compiled with the trainer's config (``configs/gms.py``, loss ``auto`` settings),
its FLOPs taken from XLA's cost analysis (an estimate of the arithmetic, valid for any backend's
*relative* cost; the CPU numbers are what this machine runs), then timed (``--repeats``).

    python benchmarks/fast_recipe.py --tokenizer taef2                 # 8 x 224², real TAEF2
    python benchmarks/fast_recipe.py --tokenizer taef2 --exact-repeats 0   # FLOPs only for exact
    python benchmarks/fast_recipe.py --quick                           # CI smoke (seconds)
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C
import _jax_side as J

NAME = "fast_recipe"


def main(argv=None) -> int:
  p = C.base_parser(__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument(
    "--exact-repeats", type=int, default=2, help="timed exact steps (0: compile and FLOPs only)"
  )
  args = J.fast_args(p, argv, exact_repeats=1)

  import jax
  import jax.numpy as jnp

  from gms_jax import recipes
  from gms_jax import step as step_lib

  machine = C.machine_info()
  b, s = args.batch, args.size
  st = J.fast_setup(args)
  tok, config, graphdef, tx, schedule = st.tok, st.config, st.graphdef, st.tx, st.schedule
  state0, images, masks = st.state0, st.images, st.masks

  # ---------------------------------------------------------------- encode (the bank build)
  encode_fn = recipes.make_encode_fn(tok, jax.local_devices()[:1])
  t0 = time.perf_counter()
  enc = encode_fn(images, masks)
  encode_compile_s = time.perf_counter() - t0
  times, _, _ = C.timed(lambda: encode_fn(images, masks), args.repeats, args.warmup, lambda x: x)
  lowered = jax.jit(
    lambda t, x, m: (tok.encode(t, x), tok.encode(t, jnp.repeat(m[..., None], 3, axis=-1)).z)
  ).lower(tok.params, images, masks)
  encode = {
    "what": "encode",
    **C.stats(times),
    "per_view_s": C.stats(times)["median_s"] / b,
    "compile_s": encode_compile_s,
    "flops": J.cost_flops(lowered.compile()),
    "times_s": times,
  }

  bank_batch = {"z_image": enc["z_image"], "z_mask": enc["z_mask"]}
  if tok.has_posterior:
    bank_batch["std_image"] = enc["std_image"]
  bank_batch_dice = dict(bank_batch, mask=masks)
  batch = {"image": images, "mask": masks}

  def measure(what, step, batch, repeats):
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state0, tok.params, batch).compile()
    compile_s = time.perf_counter() - t0
    state = jax.tree.map(jnp.copy, state0)
    holder = {"state": state}

    def run():
      holder["state"], m = compiled(holder["state"], tok.params, batch)
      return m

    rec = {"what": what, "compile_s": compile_s, "flops": J.cost_flops(compiled)}
    if repeats > 0:
      times, peak, m = C.timed(run, repeats, args.warmup, jax.block_until_ready)
      rec.update(C.stats(times), times_s=times, last_loss=float(m["loss"]), peak_rss_bytes=peak)
    print(
      f"{what}: {rec.get('median_s', float('nan')):.3f} s/step, "
      f"{(rec['flops'] or 0) / 1e9:.1f} GFLOP, compile {compile_s:.1f}s",
      flush=True,
    )
    return rec

  kw1 = step_lib.banked_loss_kwargs(config, dice=False)
  kw2 = step_lib.banked_loss_kwargs(config, dice=True)
  records = [
    encode,
    measure(
      "banked phase 1 (latent MSE)",
      step_lib.make_train_step(graphdef, tok, tx, schedule, kw1, banked=True),
      bank_batch,
      args.repeats,
    ),
    measure(
      "banked phase 2 (+ decoder Dice)",
      step_lib.make_train_step(graphdef, tok, tx, schedule, kw2, banked=True),
      bank_batch_dice,
      args.repeats,
    ),
    measure(
      "exact (SPEC §3)",
      step_lib.make_train_step(graphdef, tok, tx, schedule, step_lib.loss_kwargs(config)),
      batch,
      args.exact_repeats,
    ),
  ]
  exact = records[-1]
  for r in records[1:]:
    if r.get("flops") and exact.get("flops"):
      r["flops_vs_exact"] = r["flops"] / exact["flops"]
    if r.get("median_s") and exact.get("median_s"):
      r["speedup_vs_exact"] = exact["median_s"] / r["median_s"]
  rows = [
    [
      r["what"],
      C.fmt(r.get("median_s")),
      C.fmt((r.get("flops") or 0) / 1e9, ".4g"),
      C.fmt(r.get("flops_vs_exact")),
      C.fmt(r.get("speedup_vs_exact")),
      C.fmt(r.get("compile_s"), ".1f"),
    ]
    for r in records
  ]
  rows[0][1] = f"{C.fmt(encode['median_s'])} ({C.fmt(encode['per_view_s'])}/view)"
  print(
    f"\n{tok.family} tokenizer, batch {b} x {s}², {machine['cpu']} x{machine['cpu_count']}, "
    f"load {machine['loadavg_at_start']}"
  )
  table = C.print_table(
    ["", "s (median)", "GFLOP (XLA estimate)", "FLOPs / exact", "speed-up vs exact", "compile s"],
    rows,
  )
  C.write_results(
    C.results_path(args, f"{NAME}_{args.tokenizer}"),
    {
      "benchmark": NAME,
      "machine": machine,
      "args": vars(args),
      "tokenizer": args.tokenizer,
      "records": records,
      "table_markdown": table,
      "loadavg_at_end": list(os.getloadavg()),
    },
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
