"""Layers shared by the tokenizer models.

``upsample2x_conv3x3``: nearest-neighbour x2 upsampling followed by a 3x3 "same" convolution,
computed without building the upsampled tensor.  Output pixel ``(2i+a, 2j+b)`` only ever sees the
input rows ``{i-1, i}`` (a=0) or ``{i, i+1}`` (a=1), and likewise for columns, so each of the four
output phases is a 2x2 convolution of the *input* with 3x3 taps summed into 2x2 (a=0: ``[w0, w1+w2]``,
a=1: ``[w0+w1, w2]``).  Same result up to float rounding (the taps are added in a different order)
with 16 instead of 36 multiply-adds per output pixel and channel pair and no 4x intermediate; the
decoders of both tokenizers upsample this way (SD-VAE ``Upsample2D``, TAE ``Upsample`` + conv).
Measured on a 2-core CPU (8x112²x64 -> 224², forward + input gradient): 1.3 s -> 0.78 s.

``remat_call``: ``fn(*modules, x)`` under ``jax.checkpoint`` when asked.  The decoders use it per
block (``decode(z, remat=True)``): the forward pass keeps only each block's input and the backward
pass recomputes one block at a time, so the decoder's activation memory is that of its largest
block instead of all of them, for the same single extra forward pass as checkpointing the whole
decoder.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

_DN = ("NHWC", "HWIO", "NHWC")
_PADS = ((1, 0), (0, 1))  # phase 0 reads rows (i-1, i); phase 1 reads rows (i, i+1)


def _fold_taps(k: jax.Array, axis: int, phase: int) -> jax.Array:
  """3 taps along ``axis`` -> the 2 taps that nearest x2 upsampling makes them equal to."""
  t0, t1, t2 = (jnp.take(k, i, axis=axis) for i in range(3))
  pair = (t0, t1 + t2) if phase == 0 else (t0 + t1, t2)
  return jnp.stack(pair, axis=axis)


def is_same_conv3x3(conv: nnx.Module) -> bool:
  """Whether ``conv`` is a stride-1, dilation-1, 3x3 ``nnx.Conv`` with padding 1 on every side."""
  if not isinstance(conv, nnx.Conv) or tuple(conv.kernel_size) != (3, 3):
    return False
  strides = conv.strides if isinstance(conv.strides, (tuple, list)) else (conv.strides,) * 2
  pad = conv.padding
  same = (
    pad == "SAME"
    or (
      isinstance(pad, (tuple, list))
      and [tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in pad] == [(1, 1), (1, 1)]
    )
    or pad == 1
  )
  dil = conv.kernel_dilation or 1
  dil = dil if isinstance(dil, (tuple, list)) else (dil, dil)
  return (
    same and tuple(strides) == (1, 1) and tuple(dil) == (1, 1) and conv.feature_group_count == 1
  )


def upsample2x_conv3x3(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """``conv(nearest_upsample_2x(x))`` for a 3x3 stride-1 padding-1 ``nnx.Conv`` (NHWC)."""
  kernel = conv.kernel[...]
  dtype = conv.dtype if conv.dtype is not None else jnp.result_type(x.dtype, kernel.dtype)
  x = x.astype(dtype)
  rows = [_fold_taps(kernel, 0, a) for a in range(2)]
  ys = []
  for a in range(2):
    ys.append(
      [
        jax.lax.conv_general_dilated(
          x,
          _fold_taps(rows[a], 1, b).astype(dtype),
          (1, 1),
          (_PADS[a], _PADS[b]),
          dimension_numbers=_DN,
          precision=conv.precision,
        )
        for b in range(2)
      ]
    )
  y = jnp.stack([jnp.stack(ys[a], axis=3) for a in range(2)], axis=2)  # (N, H, 2, W, 2, K)
  n, h, _, w, _, k = y.shape
  y = y.reshape(n, 2 * h, 2 * w, k)
  if conv.bias is not None:
    y = y + conv.bias[...].astype(dtype)
  return y


def remat_call(fn: Callable, modules, x: jax.Array, remat: bool) -> jax.Array:
  """``fn(*modules, x)``; with ``remat`` its intermediates are recomputed in the backward pass
  (``jax.checkpoint`` over the modules' state and ``x``), so only ``x`` is kept for it."""
  if not remat:
    return fn(*modules, x)
  split = [nnx.split(m) for m in modules]

  def pure(states, x):
    return fn(*(nnx.merge(g, st) for (g, _), st in zip(split, states)), x)

  return jax.checkpoint(pure)([st for _, st in split], x)
