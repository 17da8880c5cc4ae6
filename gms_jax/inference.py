"""Inference (SPEC §4): image -> latent -> mapper ``"out"`` head -> decoded grey mask.

Pure and jit-able; used by training-time validation, ``gms-jax evaluate`` and ``gms-jax predict``.
No latent noise; threshold the probabilities with ``> 0.5`` (:data:`THRESHOLD`) for the binary mask.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
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
