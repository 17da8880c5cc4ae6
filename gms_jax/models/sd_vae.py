"""The Stable Diffusion VAE ("kl-f8", LDM ``AutoencoderKL``) in Flax NNX, NHWC (docs/METHOD.md §1).

Parameter paths mirror the LDM/CompVis module names so the key map from an LDM checkpoint is almost
the identity: ``encoder/down/0/block/1/conv1/kernel``, ``encoder/down/0/downsample/conv/kernel``,
``encoder/mid/attn_1/q/kernel``, ``decoder/up/3/block/0/nin_shortcut/kernel`` (``up/3`` is the
deepest level, applied first, as in LDM), ``quant_conv``, ``post_quant_conv``.  GroupNorm params
are ``scale``/``bias``; conv kernels are HWIO (attention q/k/v/proj_out are 1x1 convs, as in LDM).

Params are float32; ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``).  Normalisation
statistics and attention logits/softmax are always computed in float32, and ``encode``/``decode``
return float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gms_jax.models import layers


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """Architecture of an LDM/diffusers ``AutoencoderKL`` (defaults: SD 1.x/2.x kl-f8)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  scaling_factor: float = 0.18215
  mid_attention: bool = True  # diffusers `mid_block_add_attention`; every SD / SD-XL VAE has it

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels:
      raise ValueError("block_out_channels must not be empty")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(
        f"block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups}"
      )

  @classmethod
  def sd(cls) -> "AutoencoderKLConfig":
    """docs/METHOD.md §1: the SD 1.x/2.x first stage GMS uses (83,653,863 params)."""
    return cls()

  @classmethod
  def tiny(cls) -> "AutoencoderKLConfig":
    """Two levels, narrow: for fast tests (same code paths: shortcut convs, down/upsampling, attn)."""
    return cls(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["block_out_channels"] = list(self.block_out_channels)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "AutoencoderKLConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown AutoencoderKLConfig fields: {unknown}")
    return cls(**dict(d))


# ----------------------------------------------------------------------------- building blocks


def _conv(cin, cout, k, *, dtype, rngs, stride=1, padding=None):
  if padding is None:
    padding = ((k // 2, k // 2), (k // 2, k // 2))
  return nnx.Conv(
    cin,
    cout,
    (k, k),
    strides=(stride, stride),
    padding=padding,
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


def _norm(c, cfg: AutoencoderKLConfig, *, dtype, rngs):
  return nnx.GroupNorm(
    c,
    num_groups=cfg.norm_num_groups,
    epsilon=cfg.norm_eps,
    use_fast_variance=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


class ResnetBlock(nnx.Module):
  """norm1 → swish → conv1 → norm2 → swish → conv2, plus (1x1 ``nin_shortcut``) skip."""

  def __init__(self, cin: int, cout: int, cfg: AutoencoderKLConfig, *, dtype, rngs: nnx.Rngs):
    self.norm1 = _norm(cin, cfg, dtype=dtype, rngs=rngs)
    self.conv1 = _conv(cin, cout, 3, dtype=dtype, rngs=rngs)
    self.norm2 = _norm(cout, cfg, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(cout, cout, 3, dtype=dtype, rngs=rngs)
    self.nin_shortcut = _conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(nnx.swish(self.norm1(x)))
    h = self.conv2(nnx.swish(self.norm2(h)))
    skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
    return skip + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over the H·W positions, scale c^-0.5, residual."""

  def __init__(self, c: int, cfg: AutoencoderKLConfig, *, dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.norm = _norm(c, cfg, dtype=dtype, rngs=rngs)
    self.q = _conv(c, c, 1, dtype=dtype, rngs=rngs)
    self.k = _conv(c, c, 1, dtype=dtype, rngs=rngs)
    self.v = _conv(c, c, 1, dtype=dtype, rngs=rngs)
    self.proj_out = _conv(c, c, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    b, hh, ww, c = x.shape
    h = self.norm(x)
    q = self.q(h).reshape(b, hh * ww, c).astype(jnp.float32)
    k = self.k(h).reshape(b, hh * ww, c).astype(jnp.float32)
    v = self.v(h).reshape(b, hh * ww, c).astype(jnp.float32)
    w = jnp.einsum("bic,bjc->bij", q, k, precision=jax.lax.Precision.HIGHEST) * (c**-0.5)
    w = jax.nn.softmax(w, axis=-1)
    h = jnp.einsum("bij,bjc->bic", w, v, precision=jax.lax.Precision.HIGHEST)
    h = h.reshape(b, hh, ww, c).astype(x.dtype if self.dtype is None else self.dtype)
    return x + self.proj_out(h)


class Downsample(nnx.Module):
  """Zero pad 1 on the bottom and right only, then 3x3 stride-2 VALID conv (LDM/diffusers)."""

  def __init__(self, c: int, *, dtype, rngs: nnx.Rngs):
    self.conv = _conv(c, c, 3, stride=2, padding="VALID", dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour ×2, then 3x3 conv (computed as four 2x2 convs, see ``layers``)."""

  def __init__(self, c: int, *, dtype, rngs: nnx.Rngs):
    self.conv = _conv(c, c, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return layers.upsample2x_conv3x3(self.conv, x)


class Level(nnx.Module):
  """One resolution level: ``block`` (list of ResnetBlocks) and an optional down/upsample."""

  def __init__(self, blocks, *, downsample=None, upsample=None):
    self.block = nnx.List(blocks)
    self.downsample = downsample
    self.upsample = upsample

  def __call__(self, x, *, remat: bool = False):
    call = lambda m, x: layers.remat_call(lambda m, x: m(x), (m,), x, remat)
    for blk in self.block:
      x = call(blk, x)
    if self.downsample is not None:
      x = call(self.downsample, x)
    if self.upsample is not None:
      x = call(self.upsample, x)
    return x


class Mid(nnx.Module):
  """block_1 → attn_1 → block_2 at the deepest width (no attn_1 when ``cfg.mid_attention`` is off)."""

  def __init__(self, c: int, cfg: AutoencoderKLConfig, *, dtype, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(c, c, cfg, dtype=dtype, rngs=rngs)
    self.attn_1 = AttnBlock(c, cfg, dtype=dtype, rngs=rngs) if cfg.mid_attention else None
    self.block_2 = ResnetBlock(c, c, cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = self.block_1(x)
    if self.attn_1 is not None:
      x = self.attn_1(x)
    return self.block_2(x)


class Encoder(nnx.Module):
  """Image NHWC → moments (2·latent_channels), before ``quant_conv``."""

  def __init__(self, cfg: AutoencoderKLConfig, *, dtype=None, rngs: nnx.Rngs):
    chs = cfg.block_out_channels
    self.conv_in = _conv(cfg.in_channels, chs[0], 3, dtype=dtype, rngs=rngs)
    levels, cin = [], chs[0]
    for i, cout in enumerate(chs):
      blocks = []
      for _ in range(cfg.layers_per_block):
        blocks.append(ResnetBlock(cin, cout, cfg, dtype=dtype, rngs=rngs))
        cin = cout
      down = Downsample(cout, dtype=dtype, rngs=rngs) if i != len(chs) - 1 else None
      levels.append(Level(blocks, downsample=down))
    self.down = nnx.List(levels)
    self.mid = Mid(chs[-1], cfg, dtype=dtype, rngs=rngs)
    self.norm_out = _norm(chs[-1], cfg, dtype=dtype, rngs=rngs)
    self.conv_out = _conv(chs[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    h = self.conv_in(x)
    for level in self.down:
      h = level(h)
    h = self.mid(h)
    return self.conv_out(nnx.swish(self.norm_out(h)))


class Decoder(nnx.Module):
  """Latent NHWC (after ``post_quant_conv``) → image NHWC.  ``up[-1]`` is the deepest level."""

  def __init__(self, cfg: AutoencoderKLConfig, *, dtype=None, rngs: nnx.Rngs):
    chs = cfg.block_out_channels
    n = len(chs)
    self.conv_in = _conv(cfg.latent_channels, chs[-1], 3, dtype=dtype, rngs=rngs)
    self.mid = Mid(chs[-1], cfg, dtype=dtype, rngs=rngs)
    # Built deepest first (creation order = LDM's), stored shallowest first (LDM's up.{i} index).
    levels, cin = [], chs[-1]
    for i in reversed(range(n)):
      cout = chs[i]
      blocks = []
      for _ in range(cfg.layers_per_block + 1):
        blocks.append(ResnetBlock(cin, cout, cfg, dtype=dtype, rngs=rngs))
        cin = cout
      up = Upsample(cout, dtype=dtype, rngs=rngs) if i != 0 else None
      levels.insert(0, Level(blocks, upsample=up))
    self.up = nnx.List(levels)
    self.norm_out = _norm(chs[0], cfg, dtype=dtype, rngs=rngs)
    self.conv_out = _conv(chs[0], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, z, *, remat: bool = False):
    """``remat``: recompute each block's activations in the backward pass (``layers.remat_call``)."""
    h = layers.remat_call(lambda c, m, z: m(c(z)), (self.conv_in, self.mid), z, remat)
    for i in reversed(range(len(self.up))):
      h = self.up[i](h, remat=remat)
    return layers.remat_call(
      lambda n, c, h: c(nnx.swish(n(h))), (self.norm_out, self.conv_out), h, remat
    )


class AutoencoderKL(nnx.Module):
  """SD VAE: ``encode(x in [-1,1]) -> (mean, logvar)``, ``decode(z unscaled) -> x in ~[-1,1]``.

  Latent scaling (``cfg.scaling_factor``) is the caller's business: ``decode`` takes the
  *unscaled* latent, as LDM's ``decode_first_stage`` does after dividing by the scale.
  """

  def __init__(self, cfg: AutoencoderKLConfig, *, dtype: Any = None, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    zc = cfg.latent_channels
    self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs)
    self.quant_conv = _conv(2 * zc, 2 * zc, 1, dtype=dtype, rngs=rngs)
    self.post_quant_conv = _conv(zc, zc, 1, dtype=dtype, rngs=rngs)

  def encode(self, x):
    """x: (B,H,W,in_channels) in [-1,1] → (mean, logvar), each (B,H/f,W/f,latent), float32.

    ``f = cfg.downsample_factor`` (8 for SD); H and W must be multiples of f."""
    moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z, *, remat: bool = False):
    """z: (B,h,w,latent) unscaled latent → (B,f·h,f·w,out_channels) image, float32.

    ``remat``: block-wise rematerialisation of the decoder (same values, less memory)."""
    return self.decoder(self.post_quant_conv(z), remat=remat).astype(jnp.float32)

  def __call__(self, x):
    """Reconstruction through the posterior mean."""
    mean, _ = self.encode(x)
    return self.decode(mean)
