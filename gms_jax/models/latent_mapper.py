"""The GMS latent mapper ``ResAttnUNet_DS`` (docs/METHOD.md §2), Flax NNX, NHWC.

A U-Net in wiring only: every block keeps the 28x28 latent resolution.  Each block is a residual
block (GroupNorm -> PReLU -> conv, twice) followed by single-head spatial self-attention; the
decoder concatenates skips on channels; four deep-supervision heads (GroupNorm -> SiLU -> conv3x3)
give the ``level3``, ``level2``, ``level1`` and ``out`` latents.

Parameter paths mirror the PyTorch attribute names of the original (``input_blocks``,
``conv1_0/resblock/{norm1,act1,conv1,norm2,act2,conv2,skip_connection}``,
``conv1_0/attention/{norm,q,k,v,proj_out}``, ``convds0/{norm,conv}``) so the key map in
:mod:`gms_jax.convert.mapper` is a readable one-to-one table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

# torch `kaiming_normal_(mode="fan_out", nonlinearity="leaky_relu")` with the default a=0:
# gain^2 = 2 / (1 + 0^2) = 2, variance = 2 / fan_out, untruncated normal.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_zeros = nnx.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class MapperConfig:
  """Shape of the latent mapper; the defaults are the GMS model (METHOD §2, 1,564,976 params)."""

  in_channels: int = 4
  out_channels: int = 4
  ch: int = 32
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  gn_groups: int = 16
  gn_eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    if len(self.ch_mult) != 4:
      raise ValueError(f"ch_mult must have 4 entries (the wiring is fixed), got {self.ch_mult}")

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["ch_mult"] = list(self.ch_mult)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "MapperConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"MapperConfig: unknown keys {unknown}")
    return cls(**dict(d))


def _conv(cin, cout, k, *, use_bias, rngs, dtype):
  return nnx.Conv(
    cin,
    cout,
    (k, k),
    padding=((k // 2, k // 2),) * 2,
    use_bias=use_bias,
    kernel_init=_conv_init,
    bias_init=_zeros,
    dtype=dtype,
    rngs=rngs,
  )


def _norm(c, cfg: MapperConfig, *, rngs, dtype):
  return nnx.GroupNorm(
    c, num_groups=cfg.gn_groups, epsilon=cfg.gn_eps, use_fast_variance=False, dtype=dtype, rngs=rngs
  )


class PReLU(nnx.Module):
  """torch ``nn.PReLU()``: ONE learnable slope for all channels (param shape (1,), init 0.25)."""

  def __init__(self, init: float = 0.25):
    self.weight = nnx.Param(jnp.full((1,), init, jnp.float32))

  def __call__(self, x):
    a = self.weight[...].astype(x.dtype)
    return jnp.where(x >= 0, x, a * x)


class ResBlock(nnx.Module):
  """GN -> PReLU -> conv3x3 -> GN -> PReLU -> conv3x3, plus a bias-free 1x1 skip when in != out."""

  def __init__(self, cin, cout, cfg: MapperConfig, *, rngs, dtype=None):
    self.norm1 = _norm(cin, cfg, rngs=rngs, dtype=dtype)
    self.act1 = PReLU()
    self.conv1 = _conv(cin, cout, 3, use_bias=True, rngs=rngs, dtype=dtype)
    self.norm2 = _norm(cout, cfg, rngs=rngs, dtype=dtype)
    self.act2 = PReLU()
    self.conv2 = _conv(cout, cout, 3, use_bias=True, rngs=rngs, dtype=dtype)
    self.skip_connection = (
      _conv(cin, cout, 1, use_bias=False, rngs=rngs, dtype=dtype) if cin != cout else None
    )

  def __call__(self, x):
    h = self.conv1(self.act1(self.norm1(x)))
    h = self.conv2(self.act2(self.norm2(h)))
    skip = x if self.skip_connection is None else self.skip_connection(x)
    return skip + h


class SpatialSelfAttention(nnx.Module):
  """Single-head self-attention over all H*W positions, scale c^-0.5, residual."""

  def __init__(self, c, cfg: MapperConfig, *, rngs, dtype=None):
    self.norm = _norm(c, cfg, rngs=rngs, dtype=dtype)
    self.q = _conv(c, c, 1, use_bias=True, rngs=rngs, dtype=dtype)
    self.k = _conv(c, c, 1, use_bias=True, rngs=rngs, dtype=dtype)
    self.v = _conv(c, c, 1, use_bias=True, rngs=rngs, dtype=dtype)
    self.proj_out = _conv(c, c, 1, use_bias=True, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    b, h, w, c = x.shape
    y = self.norm(x)
    q = self.q(y).reshape(b, h * w, c)
    k = self.k(y).reshape(b, h * w, c)
    v = self.v(y).reshape(b, h * w, c)
    logits = jnp.einsum("bic,bjc->bij", q, k)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) * (c**-0.5)  # >= f32
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, h, w, c)
    return x + self.proj_out(out)


class ResAttBlock(nnx.Module):
  """``ResBlock(cin, cout)`` then ``SpatialSelfAttention(cout)``."""

  def __init__(self, cin, cout, cfg: MapperConfig, *, rngs, dtype=None):
    self.resblock = ResBlock(cin, cout, cfg, rngs=rngs, dtype=dtype)
    self.attention = SpatialSelfAttention(cout, cfg, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    return self.attention(self.resblock(x))


class Head(nnx.Module):
  """Deep-supervision head: GN -> SiLU -> conv3x3 without bias."""

  def __init__(self, cin, cout, cfg: MapperConfig, *, rngs, dtype=None):
    self.norm = _norm(cin, cfg, rngs=rngs, dtype=dtype)
    self.conv = _conv(cin, cout, 3, use_bias=False, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    return self.conv(nnx.silu(self.norm(x)))


class ResAttnUNet_DS(nnx.Module):  # the original's name
  """Latent mapper: ``z (B,H,W,in_channels) -> {"level3","level2","level1","out"}`` (B,H,W,out)."""

  def __init__(self, cfg: MapperConfig = MapperConfig(), *, rngs: nnx.Rngs, dtype=None):
    self.cfg = cfg
    self.dtype = dtype
    c, m = cfg.ch, cfg.ch_mult
    blk = lambda cin, cout: ResAttBlock(cin, cout, cfg, rngs=rngs, dtype=dtype)
    head = lambda cin: Head(cin, cfg.out_channels, cfg, rngs=rngs, dtype=dtype)
    self.input_blocks = _conv(cfg.in_channels, c, 3, use_bias=True, rngs=rngs, dtype=dtype)
    self.conv1_0 = blk(c, c * m[0])
    self.conv2_0 = blk(c * m[0], c * m[1])
    self.conv3_0 = blk(c * m[1], c * m[2])
    self.conv4_0 = blk(c * m[2], c * m[3])
    self.conv3_1 = blk(c * (m[2] + m[3]), c * m[2])
    self.conv2_2 = blk(c * (m[1] + m[2]), c * m[1])
    self.conv1_3 = blk(c * (m[0] + m[1]), c * m[0])
    self.conv0_4 = blk(c * (1 + m[0]), c)
    self.convds3 = head(c * m[2])
    self.convds2 = head(c * m[1])
    self.convds1 = head(c * m[0])
    self.convds0 = head(c)

  def __call__(self, z) -> dict[str, jax.Array]:
    cat = lambda a, b: jnp.concatenate([a, b], axis=-1)
    x0 = self.input_blocks(z)
    x1 = self.conv1_0(x0)
    x2 = self.conv2_0(x1)
    x3 = self.conv3_0(x2)
    x4 = self.conv4_0(x3)
    x3_1 = self.conv3_1(cat(x3, x4))
    x2_2 = self.conv2_2(cat(x2, x3_1))
    x1_3 = self.conv1_3(cat(x1, x2_2))
    x0_4 = self.conv0_4(cat(x0, x1_3))
    return {
      "level3": self.convds3(x3_1),
      "level2": self.convds2(x2_2),
      "level1": self.convds1(x1_3),
      "out": self.convds0(x0_4),
    }


def num_params(model: nnx.Module) -> int:
  """Total number of parameters of an NNX model."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ----------------------------------------------------------------------------- construction
# The one place a mapper is built: training, checkpoint restore, converters, import and tests.


def create(cfg: MapperConfig, key: jax.Array, *, dtype=None) -> ResAttnUNet_DS:
  """A randomly initialised mapper (METHOD §2 init) from a PRNG key; ``dtype`` = compute dtype."""
  return ResAttnUNet_DS(cfg, rngs=nnx.Rngs(params=key), dtype=dtype)


def abstract(cfg: MapperConfig, dtype=None) -> ResAttnUNet_DS:
  """The mapper as shapes only (``nnx.eval_shape``): nothing is allocated or initialised."""
  return nnx.eval_shape(lambda: ResAttnUNet_DS(cfg, rngs=nnx.Rngs(0), dtype=dtype))


def param_shapes(cfg: MapperConfig) -> dict[str, tuple[int, ...]]:
  """``{"conv1_0/resblock/conv1/kernel": shape, ...}``: flat ``/``-joined parameter paths."""
  out = {}
  for path, leaf in nnx.to_flat_state(nnx.state(abstract(cfg), nnx.Param)):
    out["/".join(str(p) for p in path)] = tuple(leaf.get_value().shape)
  return out
