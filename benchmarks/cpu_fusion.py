#!/usr/bin/env python
"""What ``config.cpu_library_fusion`` buys on this CPU: XLA's defaults vs YNNPACK library fusions.

The trainers pass ``gms_jax.step.compiler_options(config)`` to every jit; this script compiles the
same four programs with each setting, in one process, and times them interleaved (round r runs
every setting once), so the ratios are side by side on one machine state:

* **encode**: ``recipes.make_encode_fn`` (the bank build: image and mask through the encoder);
* **banked phase 1 / phase 2**: ``step.make_train_step(..., banked=True)`` without / with the decoder Dice;
* **exact**: ``step.make_train_step`` (docs/METHOD.md §3).

Each setting's outputs are compared with XLA's defaults from the same inputs and state (encode:
max |difference| of the latents; steps: the loss of every timed step, which sees the same batch
and, through the same updates, the same parameters up to rounding).

    python benchmarks/cpu_fusion.py                                  # TAEF2, 8 x 224²
    python benchmarks/cpu_fusion.py --fusions "" dot,reduce dot      # other settings
    python benchmarks/cpu_fusion.py --quick                          # CI smoke: encode, phase 1
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C
import _jax_side as J

NAME = "cpu_fusion"


def main(argv=None) -> int:
  p = C.base_parser(__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument(
    "--fusions",
    nargs="+",
    default=["", "dot,reduce"],
    help="config.cpu_library_fusion values; the first is the reference",
  )
  p.add_argument(
    "--slow-repeats",
    type=int,
    default=2,
    help="timed rounds of phase 2 and exact (~20 s a step here)",
  )
  args = J.fast_args(p, argv, slow_repeats=1)

  import jax
  import jax.numpy as jnp
  import numpy as np

  from gms_jax import recipes
  from gms_jax import step as step_lib

  machine = C.machine_info()
  b, s = args.batch, args.size
  st = J.fast_setup(args)
  tok, config, graphdef, tx, schedule = st.tok, st.config, st.graphdef, st.tx, st.schedule
  state0, images, masks = st.state0, st.images, st.masks
  settings = [str(f) for f in args.fusions]
  opts = {f: step_lib.cpu_compiler_options(f, "cpu") for f in settings}

  # ---------------------------------------------------------------- compile everything
  ref_enc = None
  encoders, enc_diff, compile_s = {}, {}, {}
  for f in settings:
    fn = recipes.make_encode_fn(tok, jax.local_devices()[:1], opts[f])
    t0 = time.perf_counter()
    out = fn(images, masks)
    compile_s[("encode", f)] = time.perf_counter() - t0
    encoders[f] = fn
    ref_enc = out if ref_enc is None else ref_enc
    enc_diff[f] = max(float(np.max(np.abs(out[k] - ref_enc[k]))) for k in ("z_image", "z_mask"))
  bank_batch = {"z_image": ref_enc["z_image"], "z_mask": ref_enc["z_mask"]}
  if tok.has_posterior:
    bank_batch["std_image"] = ref_enc["std_image"]
  programs = {
    "banked phase 1 (latent MSE)": (
      step_lib.make_train_step(
        graphdef, tok, tx, schedule, step_lib.banked_loss_kwargs(config, dice=False), banked=True
      ),
      bank_batch,
      args.repeats,
    ),
    "banked phase 2 (+ decoder Dice)": (
      step_lib.make_train_step(
        graphdef, tok, tx, schedule, step_lib.banked_loss_kwargs(config, dice=True), banked=True
      ),
      dict(bank_batch, mask=masks),
      args.slow_repeats,
    ),
    "exact (SPEC §3)": (
      step_lib.make_train_step(graphdef, tok, tx, schedule, step_lib.loss_kwargs(config, "cpu")),
      {"image": images, "mask": masks},
      args.slow_repeats,
    ),
  }
  if args.quick:  # CI smoke: encode and phase 1 only (the others compile for ~20 s each)
    programs = dict(list(programs.items())[:1])
  compiled, states = {}, {}
  for what, (fn, batch, _) in programs.items():
    for f in settings:
      t0 = time.perf_counter()
      compiled[(what, f)] = (
        jax.jit(fn, donate_argnums=(0,), compiler_options=opts[f])
        .lower(state0, tok.params, batch)
        .compile()
      )
      compile_s[(what, f)] = time.perf_counter() - t0
      states[(what, f)] = jax.tree.map(jnp.copy, state0)
    print(f"compiled {what} x{len(settings)}", flush=True)

  # ---------------------------------------------------------------- interleaved timing
  times = {k: [] for k in compile_s}
  losses = {k: [] for k in compile_s}
  for r in range(args.warmup + args.repeats):
    for f in settings:
      t0 = time.perf_counter()
      jax.block_until_ready(encoders[f](images, masks))
      if r >= args.warmup:
        times[("encode", f)].append(time.perf_counter() - t0)
    for what, (_, batch, reps) in programs.items():
      if r >= args.warmup + reps:
        continue
      for f in settings:
        t0 = time.perf_counter()
        states[(what, f)], m = compiled[(what, f)](states[(what, f)], tok.params, batch)
        jax.block_until_ready(m)
        if r >= args.warmup:
          times[(what, f)].append(time.perf_counter() - t0)
        losses[(what, f)].append(float(m["loss"]))
    print(f"round {r + 1}/{args.warmup + args.repeats}", flush=True)

  # ---------------------------------------------------------------- report
  records, rows = [], []
  ref = settings[0]
  for what in ["encode", *programs]:
    base = C.stats(times[(what, ref)])["median_s"]
    for f in settings:
      st = C.stats(times[(what, f)])
      per = st["median_s"] / b if what == "encode" else st["median_s"]
      if what == "encode":
        diff = enc_diff[f]
      else:
        diff = max(
          (abs(x - y) for x, y in zip(losses[(what, f)], losses[(what, ref)])), default=0.0
        )
      rec = {
        "what": what,
        "fusion": f,
        "compiler_options": opts[f],
        **st,
        "times_s": times[(what, f)],
        "compile_s": compile_s[(what, f)],
        "speedup_vs_first": base / st["median_s"] if st["median_s"] else None,
        "max_abs_diff_vs_first": diff,
      }
      if what != "encode":
        rec["losses"] = losses[(what, f)]
      records.append(rec)
      rows.append(
        [
          what,
          repr(f),
          C.fmt(per) + (" /view" if what == "encode" else " /step"),
          C.fmt(rec["speedup_vs_first"]),
          C.fmt(diff, ".2g"),
          C.fmt(compile_s[(what, f)], ".1f"),
        ]
      )
  print(
    f"\n{tok.family} tokenizer, batch {b} x {s}², {machine['cpu']} x{machine['cpu_count']} "
    f"({(machine['cpu_peak_estimate'] or {}).get('simd', '?')}), "
    f"load {machine['loadavg_at_start']}, {args.repeats} rounds "
    f"({args.slow_repeats} for phase 2 / exact)"
  )
  table = C.print_table(
    [
      "",
      "cpu_library_fusion",
      "s (median)",
      f"speed-up vs {ref!r}",
      f"max |diff| vs {ref!r}",
      "compile s",
    ],
    rows,
  )
  C.write_results(
    C.results_path(args, f"{NAME}_{args.tokenizer}"),
    {
      "benchmark": NAME,
      "machine": machine,
      "args": vars(args),
      "records": records,
      "table_markdown": table,
      "loadavg_at_end": list(os.getloadavg()),
    },
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
