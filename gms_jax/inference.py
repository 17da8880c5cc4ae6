"""Inference (SPEC §4): image -> latent -> mapper ``"out"`` head -> decoded grey mask.

Pure and jit-able; used by training-time validation, ``gms-jax evaluate`` and ``gms-jax predict``.
No latent noise; threshold the probabilities with ``> 0.5`` (:data:`THRESHOLD`) for the binary mask.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

THRESHOLD = 0.5  # SPEC §4: prediction = decoded mask > 0.5


def predict_probs(mapper_graphdef: Any, mapper_params: Any, tokenizer: Any, tok_params: Any,
                  images01: jax.Array) -> jax.Array:
  """(N,S,S,3) images in [0,1] -> (N,S,S) float32 mask probabilities in [0,1]."""
  lat = tokenizer.encode(tok_params, jnp.asarray(images01, jnp.float32))
  mapper = nnx.merge(mapper_graphdef, mapper_params)
  z = mapper(lat.z)["out"].astype(jnp.float32)
  return tokenizer.decode_mask(tok_params, z)


def predict_masks(mapper_graphdef: Any, mapper_params: Any, tokenizer: Any, tok_params: Any,
                  images01: jax.Array) -> jax.Array:
  """(N,S,S,3) images in [0,1] -> (N,S,S) bool masks (probabilities > 0.5)."""
  return predict_probs(mapper_graphdef, mapper_params, tokenizer, tok_params, images01) > THRESHOLD


def in_fixed_batches(run: Callable[[np.ndarray], Any], images01: np.ndarray, batch_size: int
                     ) -> np.ndarray:
  """``run`` (a compiled function of one ``batch_size`` batch, e.g. :func:`predict_probs` jitted,
  sharded or not) over all of ``images01``: the last batch is padded with copies of the last image
  and their outputs dropped, so one shape is ever compiled. The one padded-batch loop of training
  validation, ``evaluate`` and ``predict``; returns the outputs concatenated as numpy."""
  out = []
  for i in range(0, len(images01), batch_size):
    chunk = images01[i:i + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(run(chunk))[:n])
  if not out:
    return np.zeros(images01.shape[:3], np.float32)
  return np.concatenate(out)
