"""The PyTorch side of the benchmark workers: the shared weights on a device, METHOD §3 helpers
(decode_mask, Dice), synchronisation and CUDA memory statistics."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from _common import rss_bytes
from _weights import diffusers_vae

SD_SCALE = 0.18215


def torch_setup(threads: int):
  import torch

  torch.set_num_threads(max(1, threads))
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  return torch, dev


def torch_load(spec: dict[str, Any], dev):
  """``(encode, decode_raw, mapper)`` as PyTorch callables on ``dev`` with the shared weights.

  ``encode(x01 NCHW) -> (z scaled, std unscaled)``; ``decode_raw(z scaled) -> NCHW`` in the
  family's own range (SD about [-1,1], TAE about [0,1]).  Frozen modules have requires_grad=False.
  """
  import torch

  from gms_jax.testing import torch_refs

  sd = torch.load(spec["torch_tok"], map_location="cpu", weights_only=True)
  if spec["family"] == "sd-vae":
    from gms_jax.models.sd_vae import AutoencoderKLConfig

    vae = diffusers_vae(AutoencoderKLConfig.from_dict(spec["tok_cfg"]))
    vae.load_state_dict(sd)
    vae.requires_grad_(False)
    vae.eval().to(dev)
    scale = float(spec["tok_cfg"].get("scaling_factor", SD_SCALE))

    def encode(x01):
      post = vae.encode(2.0 * x01 - 1.0).latent_dist
      return scale * post.mean, post.std

    def decode_raw(z):
      return vae.decode(z / scale).sample

    modules = [vae]
  else:
    c = spec["tok_cfg"]
    enc = torch_refs.tae_encoder(c["latent_channels"], c["midblock_gn"])
    dec = torch_refs.tae_decoder(c["latent_channels"], c["midblock_gn"])
    enc.load_state_dict(
      {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    )
    dec.load_state_dict(
      {k[len("decoder.") :]: v for k, v in sd.items() if k.startswith("decoder.")}
    )
    for m in (enc, dec):
      m.requires_grad_(False)
      m.eval().to(dev)

    def encode(x01):
      z = enc(x01)
      return z, torch.zeros_like(z)

    decode_raw = dec
    modules = [enc, dec]
  mapper = torch_refs.ResAttnUNet_DS(
    in_channel=spec["latent_channels"], out_channels=spec["latent_channels"]
  )
  mapper.load_state_dict(torch.load(spec["torch_mapper"], map_location="cpu", weights_only=True))
  mapper.to(dev)
  return encode, decode_raw, mapper, modules


class TorchWorker(NamedTuple):
  """What every PyTorch worker starts from (``torch_worker_setup``)."""

  torch: Any
  dev: Any
  family: str
  encode: Callable
  decode_raw: Callable
  mapper: Any
  rec: dict[str, Any]  # the record's common fields: threads, device, impl, RSS after setup


def torch_worker_setup(job: dict[str, Any]) -> TorchWorker:
  """Threads, device, the shared weights (``torch_load``) and the record's common fields."""
  torch, dev = torch_setup(job["threads"])
  family = job["spec"]["family"]
  encode, decode_raw, mapper, _ = torch_load(job["spec"], dev)
  rec = {
    "threads": torch.get_num_threads(),
    "interop_threads": torch.get_num_interop_threads(),
    "device": str(dev),
    "rss_after_setup_bytes": rss_bytes(),
    "impl": "diffusers AutoencoderKL" if family == "sd-vae" else "torch_refs TAE",
  }
  return TorchWorker(torch, dev, family, encode, decode_raw, mapper, rec)


def torch_images(images, dev):
  """NHWC float numpy images -> a contiguous NCHW tensor on ``dev``."""
  import torch

  return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(dev)


def torch_decode_mask(family: str, decode_raw, z):
  """METHOD §3 ``decode``: decoder -> mean over RGB -> (x+1)/2 for SD -> clamp [0,1]; (B,H,W)."""
  g = decode_raw(z).float().mean(dim=1)
  if family == "sd-vae":
    g = (g + 1.0) / 2.0
  return g.clamp(0.0, 1.0)


def torch_dice(pred, target, smooth=1e-5):
  """MONAI ``DiceLoss()`` defaults on (B,H,W) maps: per sample, then mean over the batch."""
  dims = tuple(range(1, pred.ndim))
  inter = (pred * target).sum(dims)
  denom = pred.sum(dims) + target.sum(dims)
  return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def torch_sync(dev):
  import torch

  if dev.type == "cuda":
    torch.cuda.synchronize()


def torch_memory_stats(dev) -> dict[str, Any]:
  import torch

  if dev.type != "cuda":
    return {}
  return {
    "peak_bytes_in_use": int(torch.cuda.max_memory_allocated()),
    "peak_bytes_reserved": int(torch.cuda.max_memory_reserved()),
  }
