"""Inference (docs/METHOD.md §4): image -> latent -> mapper ``"out"`` head -> decoded grey mask.

Pure and jit-able; used by training-time validation, ``gms-jax evaluate`` and ``gms-jax predict``.
No latent noise; threshold the probabilities with ``> 0.5`` (:data:`THRESHOLD`) for the binary mask.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

THRESHOLD = 0.5  # docs/METHOD.md §4: prediction = decoded mask > 0.5


def predict_probs(
  mapper_graphdef: Any,
  mapper_params: Any,
  tokenizer: Any,
  tok_params: Any,
  images01: jax.Array,
  *,
  classes: Any = None,
) -> jax.Array:
  """(N,S,S,3) images in [0,1] -> (N,S,S) float32 mask probabilities in [0,1] (binary), or
  (N,S,S,K) class scores (:meth:`gms_jax.classes.Classes.scores`) for ``classes`` of C > 2."""
  lat = tokenizer.encode(tok_params, jnp.asarray(images01, jnp.float32))
  return probs_from_latents(
    mapper_graphdef, mapper_params, tokenizer, tok_params, lat.z, classes=classes
  )


def probs_from_latents(
  mapper_graphdef: Any,
  mapper_params: Any,
  tokenizer: Any,
  tok_params: Any,
  z_image: jax.Array,
  *,
  classes: Any = None,
) -> jax.Array:
  """:func:`predict_probs` after the encoder: (N,h,w,C) image latents -> probabilities."""
  mapper = nnx.merge(mapper_graphdef, mapper_params)
  z = mapper(z_image)["out"].astype(jnp.float32)
  if classes is None or classes.binary:
    return tokenizer.decode_mask(tok_params, z)
  return classes.scores_from_latent(tokenizer, tok_params, z)


def in_fixed_batches(
  run: Callable[[np.ndarray], Any], images01: np.ndarray, batch_size: int
) -> np.ndarray:
  """``run`` (a compiled function of one ``batch_size`` batch, e.g. :func:`predict_probs` jitted,
  sharded or not) over all of ``images01``: the last batch is padded with copies of the last image
  and their outputs dropped, so one shape is ever compiled. The one padded-batch loop of training
  validation, ``evaluate`` and ``predict``; returns the outputs concatenated as numpy."""
  out = []
  for i in range(0, len(images01), batch_size):
    chunk = images01[i : i + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(run(chunk))[:n])
  if not out:
    return np.zeros(images01.shape[:3], np.float32)  # binary shape: callers of no input
  return np.concatenate(out)


# Test-time augmentation (off by default: METHOD §4 predicts once). The views are elements of the
# dihedral group D4 of the square image — the flips and 90° rotations METHOD §3 trains with — as
# (k, flip): rotate k·90° counter-clockwise in the (H, W) plane, then flip left-right if ``flip``.
# Probabilities of the views are mapped back and averaged, then thresholded as usual.
TTA_VIEWS: dict[str, tuple[tuple[int, bool], ...]] = {
  "none": ((0, False),),
  "flip": ((0, False), (0, True)),
  "d4": tuple((k, f) for f in (False, True) for k in range(4)),
}


def dihedral(x: np.ndarray, k: int, flip: bool) -> np.ndarray:
  """View (k, flip) of (N, S, S, ...) arrays: ``rot90`` by k in axes (1, 2), then left-right flip."""
  x = np.rot90(x, k, axes=(1, 2))
  return np.flip(x, axis=2) if flip else x


def undo_dihedral(y: np.ndarray, k: int, flip: bool) -> np.ndarray:
  """The inverse of :func:`dihedral` (flip first, then rotate by -k)."""
  if flip:
    y = np.flip(y, axis=2)
  return np.rot90(y, -k, axes=(1, 2))


def check_tta(tta: str) -> str:
  """``tta`` if it names :data:`TTA_VIEWS`, else a one-line ValueError."""
  if tta not in TTA_VIEWS:
    raise ValueError(
      f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_VIEWS)}"
    )
  return tta


def tta_probs(
  probs_fn: Callable[[np.ndarray], np.ndarray], images01: np.ndarray, tta: str
) -> np.ndarray:
  """Mean of ``probs_fn`` ((N,S,S,3) -> (N,S,S) or (N,S,S,K) class scores) over the views of :data:`TTA_VIEWS` ``[tta]``,
  each mapped back to the input's orientation."""
  views = TTA_VIEWS[check_tta(tta)]
  total = None
  for k, flip in views:
    p = undo_dihedral(
      np.asarray(probs_fn(np.ascontiguousarray(dihedral(images01, k, flip)))), k, flip
    )
    total = p.astype(np.float32) if total is None else total + p
  return np.ascontiguousarray(total / np.float32(len(views)))
