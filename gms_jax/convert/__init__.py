"""PyTorch -> Flax weight converters (strict) and the ``gms-jax convert`` command.

``convert(fmt, src)`` returns ``(flat_params, family, config_dict)``; ``main`` writes them as a
safetensors file of Flax parameters (flat ``/``-joined paths; family and config in the metadata)
that :func:`gms_jax.tokenizers.load` / :func:`gms_jax.convert.core.load_params` read without torch.
"""

from __future__ import annotations

import argparse
import os
import time

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


def convert(fmt: str, src: str, *, scaling_factor: float | None = None
            ) -> tuple[dict[str, np.ndarray], str, dict]:
  """Converts the checkpoint at ``src`` of format ``fmt`` (a key of ``FORMATS``).

  SD VAEs: the architecture is read from the weights; ``scaling_factor`` overrides the latent
  scale (default: the folder's ``config.json``, else 0.18215)."""
  if fmt in ("diffusers", "ldm"):
    from gms_jax.convert import sd_vae  # pylint: disable=import-outside-toplevel
    load = sd_vae.load_diffusers if fmt == "diffusers" else sd_vae.load_ldm
    flat, cfg = load(src, scaling_factor=scaling_factor)
    return flat, "sd-vae", cfg.to_dict()
  if fmt == "gms-mapper":
    from gms_jax.convert import mapper  # pylint: disable=import-outside-toplevel
    flat, cfg = mapper.load_gms_mapper(src)
    return flat, "mapper", cfg.to_dict()
  if fmt == "tae":
    from gms_jax.convert import tae  # pylint: disable=import-outside-toplevel
    flat, cfg = tae.load_tae(*tae.find_pair(src))
    return flat, "tae", cfg.to_dict()
  raise ValueError(f"unknown format {fmt!r}; one of {sorted(FORMATS)}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="gms-jax convert",
      description="Convert PyTorch weights to a Flax safetensors parameter file (strict: any missing, "
                  "unexpected or mis-shaped key is an error).",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="formats:\n" + "\n".join(f"  {k:11s} {v}" for k, v in FORMATS.items()))
  parser.add_argument("--format", required=True, choices=sorted(FORMATS))
  parser.add_argument("src", help="source checkpoint file or directory")
  parser.add_argument("out", help="output .safetensors file (written atomically)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing OUT (by default an existing file is never replaced)")
  parser.add_argument("--scaling-factor", type=float, default=None,
                      help="SD VAE latent scale (default: config.json's, else 0.18215; SD-XL: 0.13025)")
  args = parser.parse_args(argv)
  if os.path.exists(args.out) and (not args.overwrite or os.path.isdir(args.out)
                                   or os.path.realpath(args.out) == os.path.realpath(args.src)):
    from gms_jax.errors import OutputError  # pylint: disable=import-outside-toplevel
    raise OutputError(f"{args.out}: exists; refusing to replace it (choose another OUT, or "
                      "--overwrite for a file that is not the source)")
  t0 = time.perf_counter()
  flat, family, config = convert(args.format, args.src,  # errors: one line via gms_jax.cli
                                 scaling_factor=args.scaling_factor)
  save_params(args.out, flat, family=family, config=config)
  n = sum(int(v.size) for v in flat.values())
  print(f"wrote {args.out}: family={family}, {len(flat)} tensors, {n:,} parameters, "
        f"{time.perf_counter() - t0:.1f}s")
  return 0
