"""Tiny autoencoders of the TAESD family (docs/METHOD.md §1.2), Flax NNX, NHWC.

``TAE.encode(x)`` takes an image in [0, 1] and returns the latent at 1/8 resolution;
``TAE.decode(z)`` soft-clamps the latent (``tanh(z/3)*3``) and returns the image as the PyTorch
decoder does, i.e. *about* [0, 1] and not clipped (the tokenizer clips).

The encoder and decoder are lists whose indices are the PyTorch ``nn.Sequential`` indices (the
checkpoint keys), parameterless layers (ReLU, Clamp, Upsample) included, so ``encoder/layers/11/
pool/norm/scale`` is torch ``11.pool.1.weight`` of ``taef2_encoder.pth``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gms_jax.models import layers as layers_lib


@dataclasses.dataclass(frozen=True)
class TAEConfig:
  """``latent_channels``: 4 (TAESD, SD 1.x/2.x latents) or 32 (TAEF2, FLUX.2 latents);
  ``midblock_gn``: the deepest encoder/decoder blocks add a GroupNorm "pool" branch (TAEF2)."""

  latent_channels: int = 4
  midblock_gn: bool = False
  channels: int = 64
  gn_groups: int = 4
  gn_eps: float = 1e-5

  @classmethod
  def taef2(cls) -> "TAEConfig":
    return cls(latent_channels=32, midblock_gn=True)

  @classmethod
  def taesd(cls) -> "TAEConfig":
    return cls(latent_channels=4, midblock_gn=False)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TAEConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"TAEConfig: unknown keys {unknown}")
    return cls(**dict(d))


def _conv(cin, cout, k=3, *, stride=1, use_bias=True, rngs, dtype):
  p = k // 2  # symmetric padding, also for the stride-2 convs (torch padding=1)
  return nnx.Conv(
    cin,
    cout,
    (k, k),
    strides=stride,
    padding=((p, p), (p, p)),
    use_bias=use_bias,
    dtype=dtype,
    rngs=rngs,
  )


class ReLU(nnx.Module):
  def __call__(self, x):
    return jax.nn.relu(x)


class Clamp(nnx.Module):
  """Soft clamp of the latent to (-3, 3)."""

  def __call__(self, x):
    return jnp.tanh(x / 3) * 3


class Upsample(nnx.Module):
  """Nearest-neighbour x2 (torch ``nn.Upsample(scale_factor=2)``)."""

  def __call__(self, x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Pool(nnx.Module):
  """Midblock-GN branch: 1x1 conv (n->4n) -> GroupNorm -> ReLU -> 1x1 conv (4n->n), no biases."""

  def __init__(self, n, cfg: TAEConfig, *, rngs, dtype=None):
    self.conv_in = _conv(n, 4 * n, 1, use_bias=False, rngs=rngs, dtype=dtype)
    self.norm = nnx.GroupNorm(
      4 * n,
      num_groups=cfg.gn_groups,
      epsilon=cfg.gn_eps,
      use_fast_variance=False,
      dtype=dtype,
      rngs=rngs,
    )
    self.conv_out = _conv(4 * n, n, 1, use_bias=False, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    return self.conv_out(jax.nn.relu(self.norm(self.conv_in(x))))


class Block(nnx.Module):
  """``relu(conv3(relu(conv2(relu(conv1(x))))) + skip(x))``, after ``x += pool(x)`` if present."""

  def __init__(self, n_in, n_out, cfg: TAEConfig, *, use_gn=False, rngs, dtype=None):
    self.conv1 = _conv(n_in, n_out, rngs=rngs, dtype=dtype)
    self.conv2 = _conv(n_out, n_out, rngs=rngs, dtype=dtype)
    self.conv3 = _conv(n_out, n_out, rngs=rngs, dtype=dtype)
    self.skip = (
      _conv(n_in, n_out, 1, use_bias=False, rngs=rngs, dtype=dtype) if n_in != n_out else None
    )
    self.pool = Pool(n_in, cfg, rngs=rngs, dtype=dtype) if use_gn else None

  def __call__(self, x):
    if self.pool is not None:
      x = x + self.pool(x)
    h = self.conv3(jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x)))))
    return jax.nn.relu(h + (x if self.skip is None else self.skip(x)))


class _Stack(nnx.Module):
  """Layers applied in order; an ``Upsample`` followed by a 3x3 conv runs as one fused
  :func:`~gms_jax.models.layers.upsample2x_conv3x3` (same result, 2.25x fewer FLOPs)."""

  def __init__(self, layers):
    self.layers = nnx.List(layers)

  def __call__(self, x, *, remat: bool = False):
    """``remat``: recompute each layer's activations (a Block, a conv, a fused upsample + conv)
    in the backward pass (``layers.remat_call``), keeping only the layers' inputs."""
    seq = list(self.layers)
    i = 0
    while i < len(seq):
      if (
        isinstance(seq[i], Upsample) and i + 1 < len(seq) and layers_lib.is_same_conv3x3(seq[i + 1])
      ):
        x = layers_lib.remat_call(layers_lib.upsample2x_conv3x3, (seq[i + 1],), x, remat)
        i += 2
        continue
      x = layers_lib.remat_call(lambda m, x: m(x), (seq[i],), x, remat)
      i += 1
    return x


class TAEEncoder(_Stack):
  """Image [0,1] (B,H,W,3) -> latent (B,H/8,W/8,latent_channels)."""

  def __init__(self, cfg: TAEConfig, *, rngs, dtype=None):
    n = cfg.channels
    conv = lambda cin, cout, **kw: _conv(cin, cout, rngs=rngs, dtype=dtype, **kw)
    down = lambda: conv(n, n, stride=2, use_bias=False)
    blocks = lambda gn=False: [
      Block(n, n, cfg, use_gn=gn, rngs=rngs, dtype=dtype) for _ in range(3)
    ]
    super().__init__(
      [
        conv(3, n),
        Block(n, n, cfg, rngs=rngs, dtype=dtype),  # 0, 1
        down(),
        *blocks(),  # 2, 3-5
        down(),
        *blocks(),  # 6, 7-9
        down(),
        *blocks(cfg.midblock_gn),  # 10, 11-13
        conv(n, cfg.latent_channels),  # 14
      ]
    )


class TAEDecoder(_Stack):
  """Latent (B,h,w,latent_channels) -> image (B,8h,8w,3) in about [0,1] (not clipped)."""

  def __init__(self, cfg: TAEConfig, *, rngs, dtype=None):
    n = cfg.channels
    conv = lambda cin, cout, **kw: _conv(cin, cout, rngs=rngs, dtype=dtype, **kw)
    blocks = lambda gn=False: [
      Block(n, n, cfg, use_gn=gn, rngs=rngs, dtype=dtype) for _ in range(3)
    ]
    super().__init__(
      [
        Clamp(),
        conv(cfg.latent_channels, n),
        ReLU(),  # 0, 1, 2
        *blocks(cfg.midblock_gn),
        Upsample(),
        conv(n, n, use_bias=False),  # 3-5, 6, 7
        *blocks(),
        Upsample(),
        conv(n, n, use_bias=False),  # 8-10, 11, 12
        *blocks(),
        Upsample(),
        conv(n, n, use_bias=False),  # 13-15, 16, 17
        Block(n, n, cfg, rngs=rngs, dtype=dtype),
        conv(n, 3),  # 18, 19
      ]
    )


class TAE(nnx.Module):
  """Tiny autoencoder: ``encode(x01) -> z``, ``decode(z) -> x`` (about [0,1])."""

  def __init__(self, cfg: TAEConfig = TAEConfig.taef2(), *, rngs: nnx.Rngs, dtype=None):
    self.cfg = cfg
    self.dtype = dtype
    self.encoder = TAEEncoder(cfg, rngs=rngs, dtype=dtype)
    self.decoder = TAEDecoder(cfg, rngs=rngs, dtype=dtype)

  def encode(self, x01):
    return self.encoder(x01)

  def decode(self, z, *, remat: bool = False):
    return self.decoder(z, remat=remat)
