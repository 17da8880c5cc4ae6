"""The JAX side of the benchmark workers: the converted weights, the product config, XLA's cost
and memory analyses, device memory and the chip peaks (from ``gms_jax.aot.CHIPS``)."""

from __future__ import annotations

from typing import Any

from _common import REPO


def product_config(size: int, dtype: str):
  """The trainer's default config (``configs/gms.py``, SPEC §3 numbers) at ``size``², ``dtype``."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  mod_spec = importlib.util.spec_from_file_location("gms_bench_config",
                                                    REPO / "configs" / "gms.py")
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  config = mod.get_config("sample")
  config.data.image_size = size
  config.precision = dtype
  return config


def jax_backend() -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count()}


def jax_dtype(name: str):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return None if name == "float32" else jnp.bfloat16


def jax_load(spec: dict[str, Any], *, remat: bool = False):
  """Tokenizer and mapper ``(tok, mapper_graphdef, mapper_params)`` from the converted files."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gms_jax import tokenizers  # pylint: disable=import-outside-toplevel
  from gms_jax.convert import core  # pylint: disable=import-outside-toplevel
  from gms_jax.models.latent_mapper import MapperConfig, ResAttnUNet_DS  # pylint: disable=import-outside-toplevel
  dtype = jax_dtype(spec["dtype"])
  tok = tokenizers.load(spec["family"], spec["flax_tok"], dtype=dtype, remat_decoder=remat)
  flat, _, mcfg = core.load_params(spec["flax_mapper"])
  mapper = nnx.eval_shape(lambda: ResAttnUNet_DS(MapperConfig.from_dict(mcfg), rngs=nnx.Rngs(0),
                                                 dtype=dtype))
  core.apply_flat(mapper, flat, source=spec["flax_mapper"])
  graphdef, params = nnx.split(mapper, nnx.Param)
  return tok, graphdef, params


def cost_flops(compiled) -> float | None:
  """FLOPs of a compiled XLA executable from its cost analysis (None if unavailable)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
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
  except Exception:  # pylint: disable=broad-except
    return {}
  if ma is None:
    return {}
  keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
          "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {k: int(getattr(ma, k)) for k in keys if getattr(ma, k, None) is not None}


def jax_memory_stats() -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  try:
    ms = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    ms = {}
  keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
  return {k: int(ms[k]) for k in keep if k in ms}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Dense peak FLOP/s of a GPU/TPU by its JAX ``device_kind`` (``gms_jax.aot.CHIPS``), or None."""
  from gms_jax import aot  # pylint: disable=import-outside-toplevel
  kind = device_kind.lower()
  for key, chip in aot.CHIPS.items():
    if key in kind or chip.name.lower() in kind:
      return chip.peak_flops.get(dtype)
  return None
