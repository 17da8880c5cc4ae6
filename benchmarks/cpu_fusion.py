#!/usr/bin/env python
"""What ``config.cpu_library_fusion`` buys on this CPU: XLA's defaults vs YNNPACK library fusions.

The trainers pass ``gms_jax.step.compiler_options(config)`` to every jit; this script compiles the
same four programs with each setting, in one process, and times them interleaved (round r runs
every setting once), so the ratios are side by side on one machine state:

* **encode**: ``train_fast.make_encode_fn`` (the bank build: image and mask through the encoder);
* **banked phase 1 / phase 2**: ``train_fast.make_banked_step`` without / with the decoder Dice;
* **exact**: ``step.make_train_step`` (SPEC §3).

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
import _common as C  # pylint: disable=wrong-import-position
import _weights as W  # pylint: disable=wrong-import-position

NAME = "cpu_fusion"


def _config():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("gms_bench_config", C.REPO / "configs" / "gms.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("sample,fast")


def main(argv=None) -> int:
  p = C.base_parser(__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--fusions", nargs="+", default=["", "dot,reduce"],
                 help="config.cpu_library_fusion values; the first is the reference")
  p.add_argument("--slow-repeats", type=int, default=2,
                 help="timed rounds of phase 2 and exact (~20 s a step here)")
  args = p.parse_args(argv)
  if args.tokenizer is None:
    args.tokenizer = "sd-vae" if args.quick else "taef2"
  if args.quick:
    args.size, args.repeats, args.warmup, args.batch, args.slow_repeats = 32, 1, 0, 2, 1
  if args.tokenizer == "both":
    p.error("--tokenizer: one of sd-vae, taef2")

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gms_jax import tokenizers  # pylint: disable=import-outside-toplevel
  from gms_jax import step as step_lib  # pylint: disable=import-outside-toplevel
  from gms_jax import train_fast  # pylint: disable=import-outside-toplevel
  from gms_jax.models.latent_mapper import MapperConfig, ResAttnUNet_DS  # pylint: disable=C0415

  machine = C.machine_info()
  if args.tokenizer == "taef2" and not args.quick:
    tok = tokenizers.load("taef2", tokenizers.packaged_path("taef2"))  # the shipped conversion
  else:  # random weights: speed does not depend on the values
    from gms_jax.models.sd_vae import AutoencoderKL  # pylint: disable=import-outside-toplevel
    tok = tokenizers.from_model("sd-vae", AutoencoderKL(W.sd_config(args.quick), rngs=nnx.Rngs(0)))
  b, s = args.batch, args.size
  config = _config()
  config.data.image_size, config.batch_size = s, b
  schedule = step_lib.make_schedule(config, 100)
  tx = step_lib.make_optimizer(config, schedule)
  mapper = ResAttnUNet_DS(MapperConfig(in_channels=tok.latent_channels,
                                       out_channels=tok.latent_channels), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(mapper, nnx.Param)
  pure = nnx.to_pure_dict(params)
  state0 = {"step": jnp.zeros((), jnp.int32), "params": pure, "opt_state": tx.init(pure),
            "rng": jax.random.PRNGKey(0)}
  images, masks = C.make_batch(b, s)
  settings = [str(f) for f in args.fusions]
  opts = {f: step_lib.cpu_compiler_options(f, "cpu") for f in settings}

  # ---------------------------------------------------------------- compile everything
  ref_enc = None
  encoders, enc_diff, compile_s = {}, {}, {}
  for f in settings:
    fn = train_fast.make_encode_fn(tok, jax.local_devices()[:1], opts[f])
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
      "banked phase 1 (latent MSE)": (train_fast.make_banked_step(
          graphdef, tok, tx, schedule, train_fast.banked_loss_kwargs(config, dice=False)),
          bank_batch, args.repeats),
      "banked phase 2 (+ decoder Dice)": (train_fast.make_banked_step(
          graphdef, tok, tx, schedule, train_fast.banked_loss_kwargs(config, dice=True)),
          dict(bank_batch, mask=masks), args.slow_repeats),
      "exact (SPEC §3)": (step_lib.make_train_step(
          graphdef, tok, tx, schedule, step_lib.loss_kwargs(config, "cpu")),
          {"image": images, "mask": masks}, args.slow_repeats),
  }
  if args.quick:  # CI smoke: encode and phase 1 only (the others compile for ~20 s each)
    programs = dict(list(programs.items())[:1])
  compiled, states = {}, {}
  for what, (fn, batch, _) in programs.items():
    for f in settings:
      t0 = time.perf_counter()
      compiled[(what, f)] = jax.jit(fn, donate_argnums=(0,), compiler_options=opts[f]).lower(
          state0, tok.params, batch).compile()
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
        diff = max((abs(x - y) for x, y in zip(losses[(what, f)], losses[(what, ref)])),
                   default=0.0)
      rec = {"what": what, "fusion": f, "compiler_options": opts[f], **st,
             "times_s": times[(what, f)], "compile_s": compile_s[(what, f)],
             "speedup_vs_first": base / st["median_s"] if st["median_s"] else None,
             "max_abs_diff_vs_first": diff}
      if what != "encode":
        rec["losses"] = losses[(what, f)]
      records.append(rec)
      rows.append([what, repr(f), C.fmt(per) + (" /view" if what == "encode" else " /step"),
                   C.fmt(rec["speedup_vs_first"]), C.fmt(diff, ".2g"),
                   C.fmt(compile_s[(what, f)], ".1f")])
  print(f"\n{tok.family} tokenizer, batch {b} x {s}², {machine['cpu']} x{machine['cpu_count']} "
        f"({(machine['cpu_peak_estimate'] or {}).get('simd', '?')}), "
        f"load {machine['loadavg_at_start']}, {args.repeats} rounds "
        f"({args.slow_repeats} for phase 2 / exact)")
  table = C.print_table(["", "cpu_library_fusion", "s (median)", f"speed-up vs {ref!r}",
                         f"max |diff| vs {ref!r}", "compile s"], rows)
  C.write_results(C.results_path(args, f"{NAME}_{args.tokenizer}"), {
      "benchmark": NAME, "machine": machine, "args": vars(args), "records": records,
      "table_markdown": table, "loadavg_at_end": list(os.getloadavg())})
  return 0


if __name__ == "__main__":
  sys.exit(main())
