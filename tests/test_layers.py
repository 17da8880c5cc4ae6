"""The fused nearest-x2-upsample + 3x3 conv equals upsampling then convolving (and its gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gms_jax.models import layers


def _reference(conv, x):
  return conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


@pytest.mark.parametrize("use_bias,hw", [(True, (5, 7)), (False, (4, 4)), (True, (1, 3))])
def test_upsample2x_conv3x3_matches_upsample_then_conv(use_bias, hw):
  conv = nnx.Conv(6, 5, (3, 3), padding=((1, 1), (1, 1)), use_bias=use_bias, rngs=nnx.Rngs(0))
  if use_bias:
    conv.bias[...] = jax.random.normal(jax.random.PRNGKey(3), conv.bias.shape)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, *hw, 6))
  with jax.default_matmul_precision("highest"):
    ref = _reference(conv, x)
    got = layers.upsample2x_conv3x3(conv, x)
    assert got.shape == ref.shape == (2, 2 * hw[0], 2 * hw[1], 5)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    # Input gradient (what training backpropagates through the frozen decoder).
    cot = jax.random.normal(jax.random.PRNGKey(2), ref.shape)
    g_ref = jax.grad(lambda x: jnp.sum(_reference(conv, x) * cot))(x)
    g_got = jax.grad(lambda x: jnp.sum(layers.upsample2x_conv3x3(conv, x) * cot))(x)
    np.testing.assert_allclose(g_got, g_ref, atol=1e-4, rtol=1e-5)


def test_upsample2x_conv3x3_is_exact_in_float64():
  """Only the order of additions differs: in float64 the two agree to rounding (~1e-15)."""
  with jax.enable_x64(True):
    conv = nnx.Conv(
      3,
      4,
      (3, 3),
      padding=((1, 1), (1, 1)),
      dtype=jnp.float64,
      param_dtype=jnp.float64,
      rngs=nnx.Rngs(0),
    )
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 5, 3), jnp.float64)
    err = float(jnp.max(jnp.abs(layers.upsample2x_conv3x3(conv, x) - _reference(conv, x))))
  assert err < 1e-12


def test_is_same_conv3x3():
  r = nnx.Rngs(0)
  assert layers.is_same_conv3x3(nnx.Conv(2, 2, (3, 3), padding=((1, 1), (1, 1)), rngs=r))
  assert layers.is_same_conv3x3(nnx.Conv(2, 2, (3, 3), padding="SAME", rngs=r))
  assert not layers.is_same_conv3x3(nnx.Conv(2, 2, (3, 3), padding="VALID", rngs=r))
  assert not layers.is_same_conv3x3(
    nnx.Conv(2, 2, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=r)
  )
  assert not layers.is_same_conv3x3(nnx.Conv(2, 2, (1, 1), rngs=r))
