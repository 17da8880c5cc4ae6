"""PyTorch -> Flax weight converters (strict) and the ``gms-jax convert`` command.

``convert(fmt, src)`` returns ``(flat_params, family, config_dict)``; ``main`` writes them as a
safetensors file of Flax parameters (flat ``/``-joined paths; family and config in the metadata)
that :func:`gms_jax.tokenizers.load` / :func:`gms_jax.convert.core.load_params` read without torch.
"""

from __future__ import annotations

import numpy as np

from gms_jax.convert.core import ConversionError, load_params, save_params  # noqa: F401

FORMATS = {
  "diffusers": "diffusers AutoencoderKL: a directory with config.json + diffusion_pytorch_model."
  "{safetensors,bin}, or a bare .safetensors (architecture read from the weights)",
  "ldm": "LDM/CompVis first-stage .ckpt ({'state_dict': ...}, optional first_stage_model. prefix; "
  "any kl-f4/kl-f8/SD/SD-XL architecture, read from the weights)",
  "gms-mapper": "official GMS latent mapper best_model.pth ({'model': state_dict})",
  "tae": "TAESD-family tokenizer: a directory holding *_encoder.pth and *_decoder.pth "
  "(e.g. taef2_encoder.pth, taef2_decoder.pth)",
}


def convert(
  fmt: str, src: str, *, scaling_factor: float | None = None
) -> tuple[dict[str, np.ndarray], str, dict]:
  """Converts the checkpoint at ``src`` of format ``fmt`` (a key of ``FORMATS``).

  SD VAEs: the architecture is read from the weights; ``scaling_factor`` overrides the latent
  scale (default: the folder's ``config.json``, else 0.18215)."""
  if fmt in ("diffusers", "ldm"):
    from gms_jax.convert import sd_vae

    load = sd_vae.load_diffusers if fmt == "diffusers" else sd_vae.load_ldm
    flat, cfg = load(src, scaling_factor=scaling_factor)
    return flat, "sd-vae", cfg.to_dict()
  if fmt == "gms-mapper":
    from gms_jax.convert import mapper

    flat, cfg = mapper.load_gms_mapper(src)
    return flat, "mapper", cfg.to_dict()
  if fmt == "tae":
    from gms_jax.convert import tae

    flat, cfg = tae.load_tae(*tae.find_pair(src))
    return flat, "tae", cfg.to_dict()
  raise ValueError(f"unknown format {fmt!r}; one of {sorted(FORMATS)}")
