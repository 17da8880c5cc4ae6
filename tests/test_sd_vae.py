"""SD VAE (kl-f8): Flax model vs diffusers' torch AutoencoderKL, converters, strictness."""

import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gms_jax.convert import core
from gms_jax.convert import sd_vae as conv
from gms_jax.models.sd_vae import AutoencoderKL, AutoencoderKLConfig, Downsample

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

TINY = AutoencoderKLConfig.tiny()
SD = AutoencoderKLConfig.sd()


# ----------------------------------------------------------------------------- torch side


def _torch_vae(cfg: AutoencoderKLConfig, seed: int):
  """A seeded diffusers AutoencoderKL with every parameter randomised (GN affine, biases too)."""
  n = len(cfg.block_out_channels)
  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(
    in_channels=cfg.in_channels,
    out_channels=cfg.out_channels,
    down_block_types=("DownEncoderBlock2D",) * n,
    up_block_types=("UpDecoderBlock2D",) * n,
    block_out_channels=cfg.block_out_channels,
    layers_per_block=cfg.layers_per_block,
    latent_channels=cfg.latent_channels,
    norm_num_groups=cfg.norm_num_groups,
    scaling_factor=cfg.scaling_factor,
    mid_block_add_attention=cfg.mid_attention,
  )
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif p.ndim == 1:  # GroupNorm scale
        p.normal_(1.0, 0.2)
      elif re.search(r"attentions\.0\.to_[qk]\.weight", name):
        p.mul_(3.0)  # sharper softmax, so the attention scale matters
  return vae.eval()


def _torch_reference(vae, x_nchw, z_nchw):
  with torch.no_grad():
    post = vae.encode(torch.from_numpy(x_nchw)).latent_dist
    dec = vae.decode(torch.from_numpy(z_nchw)).sample
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  return nhwc(post.mean), nhwc(post.logvar), nhwc(dec)


def _numpy_sd(vae):
  return {k: v.detach().numpy().copy() for k, v in vae.state_dict().items()}


_ATTN_OLD = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_ATTN_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _to_old_diffusers(sd):
  out = {}
  for k, v in sd.items():
    for new, old in _ATTN_OLD.items():
      k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    out[k] = v
  return out


def _to_ldm(sd, n_levels):
  """diffusers → LDM names, written independently of the converter under test."""
  out = {}
  for k, v in sd.items():
    k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
    k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
    k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_levels - 1 - int(m[1])}.block.", k)
    k = re.sub(
      r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_levels - 1 - int(m[1])}.upsample.", k
    )
    k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
    if "mid_block.attentions.0." in k:
      k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
      for new, old in _ATTN_LDM.items():
        k = k.replace(f"attn_1.{new}.", f"attn_1.{old}.")
      if k.endswith("weight") and v.ndim == 2:
        v = v[:, :, None, None]  # LDM attention projections are 1x1 convs
    k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    out[k] = v
  return out


def _check_ldm_renaming(vae, ldm_sd):
  """diffusers' own LDM → diffusers converter must give back exactly the original state dict."""
  orig = vae.state_dict()
  back = single_file_utils.convert_ldm_vae_checkpoint(
    {"first_stage_model." + k: torch.from_numpy(np.asarray(v)) for k, v in ldm_sd.items()},
    vae.config,
  )
  assert sorted(back) == sorted(orig)
  for k, v in orig.items():
    assert back[k].shape == v.shape and torch.equal(back[k], v), k


# ----------------------------------------------------------------------------- flax side


@nnx.jit
def _flax_run(model, x, z):
  mean, logvar = model.encode(x)
  return mean, logvar, model.decode(z)


def _flax_model(cfg, flat, dtype=None):
  # Abstract construction + loading: eager random init of every kernel is slow on CPU.
  model = nnx.eval_shape(lambda: AutoencoderKL(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
  core.apply_flat(model, flat)
  return model


def _inputs(cfg, shape, seed):
  rng = np.random.default_rng(seed)
  b, h, w = shape
  f = cfg.downsample_factor
  x = rng.uniform(-1, 1, (b, cfg.in_channels, h, w)).astype(np.float32)
  z = rng.normal(size=(b, cfg.latent_channels, h // f, w // f)).astype(np.float32)
  return x, z


def _errors(got, ref):
  return [float(np.max(np.abs(np.asarray(g, np.float64) - r))) for g, r in zip(got, ref)]


# ----------------------------------------------------------------------------- tiny parity


@pytest.fixture(scope="module")
def tiny_case():
  vae = _torch_vae(TINY, seed=0)
  x, z = _inputs(TINY, (2, 32, 48), seed=1)  # non-square, batch 2
  ref = _torch_reference(vae, x, z)
  return vae, x, z, ref


@pytest.mark.parametrize("fmt", ["diffusers", "diffusers-old-attn", "ldm"])
def test_tiny_parity(tiny_case, fmt):
  vae, x, z, ref = tiny_case
  sd = _numpy_sd(vae)
  if fmt == "diffusers-old-attn":
    sd = _to_old_diffusers(sd)
    assert any(".query." in k for k in sd) and not any(".to_q." in k for k in sd)
  elif fmt == "ldm":
    sd = _to_ldm(sd, len(TINY.block_out_channels))
    _check_ldm_renaming(vae, sd)
  flat = conv.convert_state_dict(sd, TINY)
  got = _flax_run(_flax_model(TINY, flat), x.transpose(0, 2, 3, 1), z.transpose(0, 2, 3, 1))
  assert all(g.dtype == jnp.float32 for g in got)
  assert [g.shape for g in got] == [r.shape for r in ref]
  errs = _errors(got, ref)
  scales = [float(np.abs(r).max()) for r in ref]
  print(
    f"\n[sd_vae tiny {fmt}] max abs err mean={errs[0]:.2e} logvar={errs[1]:.2e} "
    f"decode={errs[2]:.2e} (max |ref| {scales[0]:.2f}/{scales[1]:.2f}/{scales[2]:.2f})"
  )
  assert min(scales) > 0.1  # the outputs are not trivially ~0
  assert max(errs) <= 1e-5, errs


# ----------------------------------------------------------------------------- full SD parity


def test_full_sd_parity():
  vae = _torch_vae(SD, seed=2)
  x, z = _inputs(SD, (1, 64, 64), seed=3)
  ref = _torch_reference(vae, x, z)
  sd = _numpy_sd(vae)
  flat = conv.convert_state_dict(sd, SD)
  assert sum(v.size for v in flat.values()) == 83_653_863
  ldm = _to_ldm(sd, len(SD.block_out_channels))
  _check_ldm_renaming(vae, ldm)
  flat_ldm = conv.convert_state_dict({"first_stage_model." + k: v for k, v in ldm.items()}, SD)
  xh, zh = x.transpose(0, 2, 3, 1), z.transpose(0, 2, 3, 1)
  model = _flax_model(SD, flat)
  for fmt, params in (("diffusers", flat), ("ldm", flat_ldm)):
    core.apply_flat(model, params)
    got = _flax_run(model, xh, zh)
    errs = _errors(got, ref)
    rel = [e / float(np.abs(r).max()) for e, r in zip(errs, ref)]
    print(
      f"\n[sd_vae full {fmt}] max abs err mean={errs[0]:.2e} logvar={errs[1]:.2e} "
      f"decode={errs[2]:.2e}; relative {rel[0]:.1e}/{rel[1]:.1e}/{rel[2]:.1e}"
    )
    assert max(rel) <= 1e-4, rel


# ----------------------------------------------------------------------------- files


def test_load_diffusers_folder_and_bare_file(tmp_path):
  vae = _torch_vae(TINY, seed=4)
  want = conv.convert_state_dict(vae.state_dict(), TINY)
  vae.save_pretrained(tmp_path / "st")
  vae.save_pretrained(tmp_path / "bin", safe_serialization=False)
  vae.save_pretrained(tmp_path / "pipeline" / "vae")  # a pipeline folder: weights in vae/
  for folder in ("st", "bin", "pipeline"):
    flat, cfg = conv.load_diffusers(str(tmp_path / folder))
    assert cfg == TINY
    assert sorted(flat) == sorted(want)
    assert all(np.array_equal(flat[k], want[k]) for k in want)
  flat, cfg = conv.load_diffusers(
    str(tmp_path / "st" / "diffusion_pytorch_model.safetensors"), cfg=TINY
  )
  assert cfg == TINY and all(np.array_equal(flat[k], want[k]) for k in want)
  # A bare file: the architecture comes from the weights; GroupNorm groups cannot, SD's 32 is assumed.
  flat, cfg = conv.load_diffusers(str(tmp_path / "st" / "diffusion_pytorch_model.safetensors"))
  assert cfg == dataclasses.replace(TINY, norm_num_groups=32)


def test_load_ldm_ckpt(tmp_path):
  vae = _torch_vae(TINY, seed=5)
  want = conv.convert_state_dict(vae.state_dict(), TINY)
  ldm = {
    "first_stage_model." + k: torch.from_numpy(np.asarray(v))
    for k, v in _to_ldm(_numpy_sd(vae), len(TINY.block_out_channels)).items()
  }
  ldm["loss.foo"] = torch.zeros(3)
  ldm["model_ema.x"] = torch.zeros(2, 2)
  path = tmp_path / "vae.ckpt"
  torch.save({"state_dict": ldm, "global_step": 7}, path)
  flat, cfg = conv.load_ldm(str(path), cfg=TINY)
  assert cfg == TINY and sorted(flat) == sorted(want)
  assert all(np.array_equal(flat[k], want[k]) for k in want)
  # Without the prefix (a VAE-only LDM file, as GMS ships): loss.* is still ignored.
  bare = {
    k[len("first_stage_model.") :]: v for k, v in ldm.items() if k.startswith("first_stage_model.")
  }
  bare["loss.logvar"] = torch.zeros(())
  torch.save({"state_dict": bare}, tmp_path / "bare.ckpt")
  flat, _ = conv.load_ldm(str(tmp_path / "bare.ckpt"), cfg=TINY)
  assert all(np.array_equal(flat[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- strictness, config


@pytest.mark.parametrize("fmt", ["diffusers", "ldm"])
def test_strict_one_error_lists_all_problems(fmt):
  sd = _numpy_sd(_torch_vae(TINY, seed=6))
  if fmt == "ldm":
    sd = _to_ldm(sd, len(TINY.block_out_channels))
  dropped = "encoder.conv_in.bias"
  extra = (
    "encoder.conv_in.extra_weight" if fmt == "ldm" else "decoder.up_blocks.0.resnets.9.conv1.weight"
  )
  reshaped = "decoder.conv_out.weight"
  del sd[dropped]
  sd[extra] = np.zeros((3,), np.float32)
  sd[reshaped] = np.zeros((3, 16, 3, 3), np.float32)
  with pytest.raises(core.ConversionError) as e:
    conv.convert_state_dict(sd, TINY, source="broken.safetensors")
  msg = str(e.value)
  assert "broken.safetensors" in msg
  assert "missing (1): encoder/conv_in/bias" in msg
  assert "unexpected (1): " + extra in msg
  assert "shape mismatch (1): " + reshaped in msg


def test_param_count_sd():
  model = nnx.eval_shape(lambda: AutoencoderKL(SD, rngs=nnx.Rngs(0)))
  shapes = core.flat_shapes(nnx.state(model, nnx.Param))
  count = lambda pre: sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(pre))
  assert count("") == 83_653_863
  assert count("encoder/") == 34_163_592
  assert "decoder/up/3/block/0/conv1/kernel" in shapes  # up/3 is the deepest (512 wide)
  assert shapes["decoder/up/3/block/0/conv1/kernel"] == (3, 3, 512, 512)
  assert shapes["decoder/up/0/block/0/nin_shortcut/kernel"] == (1, 1, 256, 128)
  assert shapes["encoder/mid/attn_1/q/kernel"] == (1, 1, 512, 512)


def test_downsample_pads_bottom_right():
  ds = Downsample(4, dtype=None, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(1, 8, 10, 4)).astype(np.float32)
  got = np.asarray(ds(jnp.asarray(x)))
  w = torch.from_numpy(np.asarray(ds.conv.kernel.get_value()).transpose(3, 2, 0, 1).copy())
  b = torch.from_numpy(np.array(ds.conv.bias.get_value()))
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  ref = torch.nn.functional.conv2d(torch.nn.functional.pad(xt, (0, 1, 0, 1)), w, b, stride=2)
  ref = ref.numpy().transpose(0, 2, 3, 1)
  assert got.shape == ref.shape == (1, 4, 5, 4)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  sym = torch.nn.functional.conv2d(xt, w, b, stride=2, padding=1).numpy().transpose(0, 2, 3, 1)
  assert (
    sym.shape == got.shape and np.abs(got - sym).max() > 1e-2
  )  # "SAME"-like padding would be caught


def test_config_roundtrip_and_diffusers_json():
  for cfg in (SD, TINY):
    assert AutoencoderKLConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  vae_cfg = dict(_torch_vae(TINY, seed=7).config)
  assert conv.config_from_diffusers_json(vae_cfg) == TINY
  with pytest.raises(core.ConversionError, match="use_quant_conv"):
    conv.config_from_diffusers_json({**vae_cfg, "use_quant_conv": False})
  with pytest.raises(ValueError):
    AutoencoderKLConfig.from_dict({**SD.to_dict(), "bogus": 1})


def test_bfloat16_compute_close_to_float32(tiny_case):
  vae, x, z, ref = tiny_case
  flat = conv.convert_state_dict(vae.state_dict(), TINY)
  model = _flax_model(TINY, flat, dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.float32 for v in core.model_to_flat(model).values())
  got = _flax_run(model, x.transpose(0, 2, 3, 1), z.transpose(0, 2, 3, 1))
  assert all(g.dtype == jnp.float32 for g in got)
  rel = [e / float(np.abs(r).max()) for e, r in zip(_errors(got, ref), ref)]
  print(f"\n[sd_vae tiny bfloat16] relative max err {rel[0]:.1e}/{rel[1]:.1e}/{rel[2]:.1e}")
  assert max(rel) < 0.1, rel


# ----------------------------------------------------------------------------- architecture inference
# Random diffusers AutoencoderKLs of different shapes convert with NO config given (diffusers
# folder, bare safetensors, LDM-renamed .ckpt) and compute what torch computes.

ARCHS = {
  "2lvl-lpb1-z4": AutoencoderKLConfig(
    block_out_channels=(32, 64), layers_per_block=1, latent_channels=4
  ),
  "3lvl-lpb2-z8-sdxl-scale": AutoencoderKLConfig(
    block_out_channels=(32, 32, 64), layers_per_block=2, latent_channels=8, scaling_factor=0.13025
  ),
  "2lvl-z16-no-mid-attn": AutoencoderKLConfig(
    block_out_channels=(64, 32), layers_per_block=1, latent_channels=16, mid_attention=False
  ),
}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_architecture_inferred_from_weights(name, tmp_path):
  cfg = ARCHS[name]
  vae = _torch_vae(cfg, seed=11)
  vae.save_pretrained(tmp_path / "diffusers")
  flat, got = conv.load_diffusers(str(tmp_path / "diffusers"))  # config.json: scale from it
  assert got == cfg
  bare = str(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors")
  flat_bare, got_bare = conv.load_diffusers(bare)  # no config at all: SD scale
  assert got_bare == dataclasses.replace(cfg, scaling_factor=0.18215)
  assert conv.load_diffusers(bare, scaling_factor=0.5)[1].scaling_factor == 0.5
  ldm = _to_ldm(_numpy_sd(vae), len(cfg.block_out_channels))
  if cfg.mid_attention:
    _check_ldm_renaming(vae, ldm)  # the test's renaming agrees with diffusers' own converter
  torch.save(
    {
      "state_dict": {
        "first_stage_model." + k: torch.from_numpy(np.asarray(v)) for k, v in ldm.items()
      }
    },
    tmp_path / "vae.ckpt",
  )
  flat_ldm, got_ldm = conv.load_ldm(str(tmp_path / "vae.ckpt"))
  assert got_ldm == got_bare
  for other in (flat_bare, flat_ldm):
    assert sorted(other) == sorted(flat) and all(np.array_equal(other[k], flat[k]) for k in flat)
  x, z = _inputs(cfg, (1, 16, 16), seed=3)
  ref = _torch_reference(vae, x, z)
  got = _flax_run(_flax_model(cfg, flat), x.transpose(0, 2, 3, 1), z.transpose(0, 2, 3, 1))
  rel = [e / float(np.abs(r).max()) for e, r in zip(_errors(got, ref), ref)]
  assert max(rel) <= 1e-5, rel


def test_contradicting_config_names_the_fields(tmp_path):
  cfg = ARCHS["2lvl-lpb1-z4"]
  vae = _torch_vae(cfg, seed=12)
  ldm = _to_ldm(_numpy_sd(vae), 2)
  torch.save(
    {"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in ldm.items()}},
    tmp_path / "vae.ckpt",
  )
  with pytest.raises(core.ConversionError) as e:
    conv.load_ldm(str(tmp_path / "vae.ckpt"), cfg=AutoencoderKLConfig.sd())  # kl-f8 assumed
  msg = str(e.value)
  assert "\n" not in msg and "vae.ckpt" in msg
  assert "block_out_channels=(128, 256, 512, 512) (weights: (32, 64))" in msg
  assert "layers_per_block=2 (weights: 1)" in msg and "latent_channels" not in msg
  vae.save_pretrained(tmp_path / "d")
  with open(tmp_path / "d" / "config.json") as f:
    d = json.load(f)
  d["latent_channels"] = 8
  with open(tmp_path / "d" / "config.json", "w") as f:
    json.dump(d, f)
  with pytest.raises(
    core.ConversionError,
    match=r"config.json contradicts the weights: latent_channels=8 \(weights: 4\)",
  ):
    conv.load_diffusers(str(tmp_path / "d"))


def test_convert_cli_scaling_factor(tmp_path):
  """`gms-jax convert --format diffusers BARE.safetensors OUT --scaling-factor 0.13025`."""
  from gms_jax import tokenizers
  from gms_jax.cli import convert

  vae = _torch_vae(ARCHS["2lvl-lpb1-z4"], seed=13)
  vae.save_pretrained(tmp_path / "d")
  bare = str(tmp_path / "d" / "diffusion_pytorch_model.safetensors")
  out = str(tmp_path / "vae.safetensors")
  assert convert.main(["--format", "diffusers", bare, out, "--scaling-factor", "0.13025"]) == 0
  _, family, cfg = core.load_params(out)
  assert family == "sd-vae" and cfg["scaling_factor"] == 0.13025
  assert cfg["block_out_channels"] == [32, 64] and cfg["layers_per_block"] == 1
  assert tokenizers.load("sd-vae", out).scale == 0.13025
