"""Identical weights for both frameworks: PyTorch modules built from a seed (or real weights),
converted to Flax with the product's converters, both written to a cache folder."""

from __future__ import annotations

import os
from typing import Any, Sequence


def sd_config(quick: bool):
  from gms_jax.models.sd_vae import AutoencoderKLConfig

  return AutoencoderKLConfig.tiny() if quick else AutoencoderKLConfig.sd()


def diffusers_vae(cfg):
  """An (untrained-init) diffusers ``AutoencoderKL`` of ``cfg``'s architecture."""
  import diffusers

  n = len(cfg.block_out_channels)
  return diffusers.AutoencoderKL(
    in_channels=cfg.in_channels,
    out_channels=cfg.out_channels,
    down_block_types=("DownEncoderBlock2D",) * n,
    up_block_types=("UpDecoderBlock2D",) * n,
    block_out_channels=cfg.block_out_channels,
    layers_per_block=cfg.layers_per_block,
    latent_channels=cfg.latent_channels,
    norm_num_groups=cfg.norm_num_groups,
    scaling_factor=cfg.scaling_factor,
  )


def prepare_weights(args, cache: str, tokenizers: Sequence[str]) -> dict[str, dict[str, Any]]:
  """Builds each tokenizer and a mapper once, writes torch state dicts and converted Flax files.

  Returns ``{tokenizer: {"torch_tok", "torch_mapper", "flax_tok", "flax_mapper", "tok_cfg",
  "mapper_cfg", "latent_channels", "downsample", "weights"}}`` (paths and plain data).
  """
  import numpy as np
  import torch

  from gms_jax.convert import core
  from gms_jax.convert import mapper as mapper_conv
  from gms_jax.models.latent_mapper import MapperConfig
  from gms_jax.testing import torch_refs

  os.makedirs(cache, exist_ok=True)
  out = {}
  for name in tokenizers:
    rec: dict[str, Any] = {}
    if name == "sd-vae":
      from gms_jax.convert import sd_vae as sd_conv

      if args.sd_vae:
        import diffusers

        flat, cfg = sd_conv.load_diffusers(args.sd_vae)
        vae = diffusers.AutoencoderKL.from_pretrained(args.sd_vae)  # needs a diffusers folder
        rec["weights"] = f"real ({args.sd_vae})"
      else:
        cfg = sd_config(args.quick)
        torch.manual_seed(args.seed)
        vae = diffusers_vae(cfg)
        flat = sd_conv.convert_state_dict(vae.state_dict(), cfg, source="random diffusers VAE")
        rec["weights"] = "random init (diffusers AutoencoderKL defaults)"
      torch_sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
      family, lat_ch, down = "sd-vae", cfg.latent_channels, cfg.downsample_factor
      rec["tok_cfg"] = cfg.to_dict()
    else:
      from gms_jax.convert import tae as tae_conv
      from gms_jax.models.tae import TAEConfig

      folder = args.taef2
      if folder and os.path.isdir(folder):
        enc_p, dec_p = tae_conv.find_pair(folder)
        sd = tae_conv.read_pair(enc_p, dec_p)
        cfg = tae_conv.infer_config(sd, source=folder)
        torch_sd = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
        rec["weights"] = f"real ({folder})"
      else:
        cfg = TAEConfig.taef2()
        torch.manual_seed(args.seed)
        enc = torch_refs.tae_encoder(cfg.latent_channels, cfg.midblock_gn)
        dec = torch_refs.tae_decoder(cfg.latent_channels, cfg.midblock_gn)
        torch_sd = {
          **{f"encoder.{k}": v for k, v in enc.state_dict().items()},
          **{f"decoder.{k}": v for k, v in dec.state_dict().items()},
        }
        sd = {k: v.numpy() for k, v in torch_sd.items()}
        rec["weights"] = "random init (TAEF2 weights not found)"
      flat = tae_conv.convert_state_dict(sd, cfg, source="taef2")
      family, lat_ch, down = "tae", cfg.latent_channels, 8
      rec["tok_cfg"] = cfg.to_dict()

    torch.manual_seed(args.seed + 1)
    tmapper = torch_refs.ResAttnUNet_DS(in_channel=lat_ch, out_channels=lat_ch)
    mcfg = MapperConfig(in_channels=lat_ch, out_channels=lat_ch)
    mflat = mapper_conv.convert_state_dict(
      {k: v.detach().numpy() for k, v in tmapper.state_dict().items()}, mcfg, source="mapper"
    )

    paths = {
      k: os.path.join(cache, f"{name}.{k}")
      for k in (
        "torch_tok.pt",
        "torch_mapper.pt",
        "flax_tok.safetensors",
        "flax_mapper.safetensors",
      )
    }
    torch.save(torch_sd, paths["torch_tok.pt"])
    torch.save(tmapper.state_dict(), paths["torch_mapper.pt"])
    core.save_params(paths["flax_tok.safetensors"], flat, family=family, config=rec["tok_cfg"])
    core.save_params(
      paths["flax_mapper.safetensors"], mflat, family="mapper", config=mcfg.to_dict()
    )
    rec.update(
      torch_tok=paths["torch_tok.pt"],
      torch_mapper=paths["torch_mapper.pt"],
      flax_tok=paths["flax_tok.safetensors"],
      flax_mapper=paths["flax_mapper.safetensors"],
      family=family,
      mapper_cfg=mcfg.to_dict(),
      latent_channels=lat_ch,
      downsample=down,
    )
    out[name] = rec
  return out
