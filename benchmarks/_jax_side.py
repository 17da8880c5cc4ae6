"""The JAX side of the benchmark workers: the converted weights, the product config, XLA's cost
and memory analyses, device memory and the chip peaks (from ``gms_jax.aot.CHIPS``)."""

from __future__ import annotations

from typing import Any

from _common import REPO


def product_config(size: int, dtype: str):
  """The trainer's default config (``configs/gms.py``: METHOD §3) at ``size``², ``dtype``."""
  import importlib.util

  mod_spec = importlib.util.spec_from_file_location("gms_bench_config", REPO / "configs" / "gms.py")
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  config = mod.get_config("sample")
  config.data.image_size = size
  config.precision = dtype
  return config


def fast_args(parser, argv, **quick):
  """Parses the fast-recipe benchmarks' arguments: one tokenizer (``--quick``: the tiny random
  SD-VAE at 32², batch 2, 1 repeat, no warm-up, plus ``quick``'s own settings)."""
  args = parser.parse_args(argv)
  if args.tokenizer is None:
    args.tokenizer = "sd-vae" if args.quick else "taef2"
  if args.quick:
    args.size, args.repeats, args.warmup, args.batch = 32, 1, 0, 2
    for key, value in quick.items():
      setattr(args, key, value)
  if args.tokenizer == "both":
    parser.error("--tokenizer: one of sd-vae, taef2")
  return args


def fast_setup(args):
  """What fast_recipe.py and cpu_fusion.py time: the ``sample,fast`` config at ``args.size``² and
  batch ``args.batch``, the tokenizer (shipped TAEF2, or a random SD-VAE for ``--quick`` /
  ``--tokenizer sd-vae``: speed does not depend on the values), a fresh mapper's train state and
  one deterministic batch. Returns a namespace with ``tok, config, graphdef, tx, schedule,
  state0, images, masks``."""
  import importlib.util
  import types

  import _common as C
  import _weights as W
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from gms_jax import step as step_lib
  from gms_jax import tokenizers
  from gms_jax.models.latent_mapper import MapperConfig, ResAttnUNet_DS

  if args.tokenizer == "taef2" and not args.quick:
    tok = tokenizers.load("taef2", tokenizers.packaged_path("taef2"))  # the shipped conversion
  else:
    from gms_jax.models.sd_vae import AutoencoderKL

    tok = tokenizers.from_model("sd-vae", AutoencoderKL(W.sd_config(args.quick), rngs=nnx.Rngs(0)))
  mod_spec = importlib.util.spec_from_file_location("gms_bench_config", REPO / "configs" / "gms.py")
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  config = mod.get_config("sample,fast")
  config.data.image_size, config.batch_size = args.size, args.batch
  schedule = step_lib.make_schedule(config, 100)
  tx = step_lib.make_optimizer(config, schedule)
  mapper = ResAttnUNet_DS(
    MapperConfig(in_channels=tok.latent_channels, out_channels=tok.latent_channels),
    rngs=nnx.Rngs(0),
  )
  graphdef, params = nnx.split(mapper, nnx.Param)
  pure = nnx.to_pure_dict(params)
  state0 = {
    "step": jnp.zeros((), jnp.int32),
    "params": pure,
    "opt_state": tx.init(pure),
    "rng": jax.random.PRNGKey(0),
  }
  images, masks = C.make_batch(args.batch, args.size)
  return types.SimpleNamespace(
    tok=tok,
    config=config,
    graphdef=graphdef,
    tx=tx,
    schedule=schedule,
    state0=state0,
    images=images,
    masks=masks,
  )


def jax_backend() -> dict[str, Any]:
  import jax

  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count()}


def jax_dtype(name: str):
  from gms_jax import tokenizers

  return tokenizers.compute_dtype(name)


def jax_load(spec: dict[str, Any], *, remat: bool = False):
  """Tokenizer and mapper ``(tok, mapper_graphdef, mapper_params)`` from the converted files."""
  from flax import nnx

  from gms_jax import tokenizers
  from gms_jax.convert import core
  from gms_jax.models.latent_mapper import MapperConfig, ResAttnUNet_DS

  dtype = jax_dtype(spec["dtype"])
  tok = tokenizers.load(spec["family"], spec["flax_tok"], dtype=dtype, remat_decoder=remat)
  flat, _, mcfg = core.load_params(spec["flax_mapper"])
  mapper = nnx.eval_shape(
    lambda: ResAttnUNet_DS(MapperConfig.from_dict(mcfg), rngs=nnx.Rngs(0), dtype=dtype)
  )
  core.apply_flat(mapper, flat, source=spec["flax_mapper"])
  graphdef, params = nnx.split(mapper, nnx.Param)
  return tok, graphdef, params


def cost_flops(compiled) -> float | None:
  """FLOPs of a compiled XLA executable from its cost analysis (None if unavailable)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca:
    return None
  f = ca.get("flops")
  return float(f) if f is not None and f > 0 else None


def memory_analysis(compiled) -> dict[str, int]:
  """XLA's static buffer assignment for a compiled executable: ``temp_size_in_bytes`` is the
  scratch (activations kept for the backward pass, workspaces) the step needs besides its
  arguments and outputs."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # backends without a cost model
    return {}
  if ma is None:
    return {}
  keys = (
    "temp_size_in_bytes",
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
  )
  return {k: int(getattr(ma, k)) for k in keys if getattr(ma, k, None) is not None}


def jax_memory_stats() -> dict[str, Any]:
  import jax

  try:
    ms = jax.devices()[0].memory_stats() or {}
  except Exception:
    ms = {}
  keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
  return {k: int(ms[k]) for k in keep if k in ms}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Dense peak FLOP/s of a GPU/TPU by its JAX ``device_kind`` (``gms_jax.aot.CHIPS``), or None."""
  from gms_jax import aot

  kind = device_kind.lower()
  for key, chip in aot.CHIPS.items():
    if key in kind or chip.name.lower() in kind:
      return chip.peak_flops.get(dtype)
  return None
