"""Tokenizer conventions (docs/METHOD.md §1, §3): scaling, posterior std, mask decoding, loading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gms_jax import tokenizers
from gms_jax.convert import core
from gms_jax.models.sd_vae import AutoencoderKL, AutoencoderKLConfig
from gms_jax.models.tae import TAEConfig

TINY = AutoencoderKLConfig.tiny()


def _all(tok, params, x):
  """encode, decode and decode_mask in one compiled call."""
  lat = tok.encode(params, x)
  return lat, tok.decode(params, lat.z), tok.decode_mask(params, lat.z)


@pytest.fixture(scope="module")
def sd_model():
  """Tiny SD VAE with random numpy weights (built abstractly: no init compile)."""
  model = nnx.eval_shape(lambda: AutoencoderKL(TINY, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  flat = {}
  for path, shape in core.flat_shapes(nnx.state(model, nnx.Param)).items():
    if path.endswith("kernel"):
      flat[path] = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif path.endswith("scale"):
      flat[path] = 1.0 + 0.1 * rng.normal(size=shape)
    else:
      flat[path] = 0.1 * rng.normal(size=shape)
  core.apply_flat(model, {k: v.astype(np.float32) for k, v in flat.items()})
  return model


@pytest.fixture(scope="module")
def sd_tok(sd_model):
  return tokenizers.from_model("sd-vae", sd_model)


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype(np.float32))


def test_sd_fields(sd_tok):
  assert sd_tok.family == "sd-vae" and sd_tok.has_posterior
  assert sd_tok.scale == pytest.approx(0.18215)
  assert sd_tok.latent_channels == 4 and sd_tok.downsample == TINY.downsample_factor
  assert isinstance(sd_tok.params, nnx.State)
  hash(sd_tok)  # usable as a static jit argument


def test_sd_encode_scaled_mean_unscaled_std(sd_tok, images):
  def both(params, x):
    mean, logvar = nnx.merge(sd_tok.graphdef, params).encode(2.0 * x - 1.0)  # the model, directly
    return sd_tok.encode(params, x), mean, logvar

  lat, mean, logvar = jax.jit(both)(sd_tok.params, images)
  np.testing.assert_allclose(lat.z, 0.18215 * np.asarray(mean), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lat.std, np.exp(np.asarray(logvar) / 2), rtol=1e-6, atol=1e-7)
  assert lat.z.shape == (2, 8, 8, 4) and lat.z.dtype == jnp.float32


def test_sd_decode_and_decode_mask_formulas(sd_tok):
  def three(params, z):
    raw = nnx.merge(sd_tok.graphdef, params).decode(z / 0.18215)  # the model, directly
    return sd_tok.decode(params, z), sd_tok.decode_mask(params, z), raw

  z = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32))
  x, m, raw = map(np.asarray, jax.jit(three)(sd_tok.params, z))
  np.testing.assert_allclose(x, np.clip((raw + 1) / 2, 0, 1), atol=1e-6)
  np.testing.assert_allclose(m, np.clip((raw.mean(-1) + 1) / 2, 0, 1), atol=1e-6)
  assert m.shape == (2, 16, 16) and float(m.min()) >= 0 and float(m.max()) <= 1


def _n_checkpoints(fn, *args) -> int:
  """Number of ``jax.checkpoint`` regions at the top level of ``fn``'s jaxpr."""
  return sum(
    e.primitive.name in ("checkpoint", "remat", "remat2")
    for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns
  )


def _check_remat(tok, tok_r, z, n_blocks):
  loss = lambda t: lambda z, p: jnp.sum(t.decode_mask(p, z) ** 2)
  vg = lambda t: jax.jit(jax.value_and_grad(loss(t)))
  (v0, g0), (v1, g1) = vg(tok)(z, tok.params), vg(tok_r)(z, tok_r.params)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  assert float(jnp.abs(g0).sum()) > 0  # gradients reach the latent through the decoder
  # same gradients up to float32 rounding (XLA fuses the recomputed blocks differently)
  np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-5 * float(jnp.abs(g0).max()))
  # one checkpoint region per decoder block, none without remat
  assert _n_checkpoints(loss(tok), z, tok.params) == 0
  assert _n_checkpoints(loss(tok_r), z, tok_r.params) == n_blocks
  # and XLA keeps less between the passes
  mem = lambda t: jax.jit(jax.grad(loss(t))).lower(z, t.params).compile().memory_analysis()
  assert mem(tok_r).temp_size_in_bytes < mem(tok).temp_size_in_bytes


def test_sd_remat_same_values_and_grads_less_memory(sd_model, sd_tok):
  tok_r = tokenizers.from_model("sd-vae", sd_model, remat_decoder=True)
  z = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 4)).astype(np.float32))
  # conv_in+mid, (layers_per_block + 1) ResnetBlocks per level, one Upsample, norm_out+conv_out
  n_blocks = 1 + len(TINY.block_out_channels) * (TINY.layers_per_block + 1) + 1 + 1
  _check_remat(sd_tok, tok_r, z, n_blocks)


def test_tae_remat_same_values_and_grads_less_memory():
  from gms_jax.models.tae import TAE

  cfg = TAEConfig(latent_channels=4, midblock_gn=True, channels=16)
  model = TAE(cfg, rngs=nnx.Rngs(3))
  tok, tok_r = (tokenizers.from_model("tae", model, remat_decoder=r) for r in (False, True))
  z = jnp.asarray(np.random.default_rng(4).normal(size=(2, 4, 4, 4)).astype(np.float32))
  # decoder layers: Clamp, conv, ReLU, 3 x (3 Blocks + fused Upsample/conv), Block, conv
  _check_remat(tok, tok_r, z, 3 + 3 * 4 + 2)


def test_sd_save_params_then_load_identical(sd_model, sd_tok, images, tmp_path):
  path = str(tmp_path / "vae.safetensors")
  core.save_params(path, core.model_to_flat(sd_model), family="sd-vae", config=TINY.to_dict())
  tok2 = tokenizers.load("sd-vae", path)
  assert tok2.config == TINY and tok2.graphdef == sd_tok.graphdef  # same graph: one compile serves
  f = jax.jit(_all, static_argnums=0)
  for a, b in zip(
    jax.tree.leaves(f(sd_tok, sd_tok.params, images)),
    jax.tree.leaves(f(sd_tok, tok2.params, images)),
  ):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(core.ConversionError, match="sd-vae"):
    tokenizers.load("tae", path)
  with pytest.raises(ValueError, match="multiple of"):
    sd_tok.encode(sd_tok.params, images[:, :15])


# ----------------------------------------------------------------------------- TAE (random weights)


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory):
  """A random TAESD-style (4 latent channels, no midblock GN) .pth pair, as published."""
  torch = pytest.importorskip("torch")
  from gms_jax.testing import torch_refs

  folder = tmp_path_factory.mktemp("taesd")
  torch.manual_seed(0)
  enc = torch_refs.randomize_(torch_refs.tae_encoder(4), seed=1).eval()
  dec = torch_refs.randomize_(torch_refs.tae_decoder(4), seed=2).eval()
  torch.save(enc.state_dict(), folder / "taesd_encoder.pth")
  torch.save(dec.state_dict(), folder / "taesd_decoder.pth")
  return folder, enc, dec


def test_tae_load_conventions_and_parity(taesd_dir, tmp_path):
  torch = pytest.importorskip("torch")
  from gms_jax.testing import torch_refs

  folder, enc, dec = taesd_dir
  tok = tokenizers.load("taesd", str(folder))
  assert tok.family == "tae" and not tok.has_posterior and tok.scale == 1.0
  assert tok.config == TAEConfig.taesd() and tok.latent_channels == 4
  x = np.random.default_rng(3).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  f = jax.jit(_all, static_argnums=0)
  lat, img, mask = f(tok, tok.params, jnp.asarray(x))
  assert lat.z.shape == lat.std.shape == (2, 4, 4, 4) and not np.any(np.asarray(lat.std))
  with torch.no_grad():
    z_ref = enc(torch_refs.nhwc_to_nchw(x))
    y_ref = torch_refs.nchw_to_nhwc(dec(z_ref))
  np.testing.assert_allclose(lat.z, torch_refs.nchw_to_nhwc(z_ref), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(img, np.clip(y_ref, 0, 1), atol=1e-5)
  np.testing.assert_allclose(mask, np.clip(y_ref.mean(-1), 0, 1), atol=1e-5)
  assert mask.shape == (2, 32, 32)

  path = str(tmp_path / "taesd.safetensors")
  tokenizers.save(tok, path)
  tok2 = tokenizers.load("tae", path)
  assert tok2.config == tok.config
  assert tok2.graphdef == tok.graphdef  # same graph: reuse tok's compiled function
  for a, b in zip(
    jax.tree.leaves((lat, img, mask)), jax.tree.leaves(f(tok, tok2.params, jnp.asarray(x)))
  ):
    np.testing.assert_array_equal(a, b)

  tok16 = tokenizers.load("taesd", str(folder), dtype=jnp.bfloat16)
  lat16 = jax.jit(tok16.encode)(tok16.params, jnp.asarray(x))  # encoder only: one small compile
  assert lat16.z.dtype == jnp.float32
  assert jax.tree.leaves(tok16.params)[0].dtype == jnp.float32  # params stay float32
  rel = float(jnp.linalg.norm(lat16.z - lat.z) / jnp.linalg.norm(lat.z))
  assert rel < 0.05, rel


def test_unknown_family_and_missing_pair(tmp_path):
  with pytest.raises(ValueError, match="unknown tokenizer family"):
    tokenizers.load("vqgan", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="encoder"):
    tokenizers.load("taef2", str(tmp_path))


def test_scaling_factor_override_only_where_there_is_a_scale():
  from gms_jax import errors

  with pytest.raises(errors.ConfigError, match="tokenizer.scaling_factor=0.5"):
    tokenizers.load("taef2", tokenizers.packaged_path("taef2"), scaling_factor=0.5)
