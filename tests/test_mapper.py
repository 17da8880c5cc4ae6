"""GMS latent mapper: Flax ResAttnUNet_DS vs an independent torch reference, converter strictness."""

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gms_jax.convert import core
from gms_jax.convert import mapper as conv
from gms_jax.models import latent_mapper
from gms_jax.models.latent_mapper import (
  Head,
  MapperConfig,
  ResBlock,
  SpatialSelfAttention,
  num_params,
)

torch = pytest.importorskip("torch")
from gms_jax.testing import torch_refs  # noqa: E402  (needs torch)

CFG = MapperConfig()
HEADS = ("level3", "level2", "level1", "out")


def _build(flat, cfg=CFG, dtype=None):
  model = latent_mapper.abstract(cfg, dtype)
  core.apply_flat(model, flat)
  return model


@pytest.fixture(scope="module")
def torch_mapper():
  torch.manual_seed(0)
  return torch_refs.randomize_(torch_refs.ResAttnUNet_DS(4, 4, 32, (1, 2, 4, 4)), seed=1).eval()


@pytest.fixture(scope="module")
def checkpoint(torch_mapper, tmp_path_factory):
  path = tmp_path_factory.mktemp("gms") / "best_model.pth"
  torch.save({"model": torch_mapper.state_dict()}, path)
  return str(path)


def _numpy_sd(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def test_config_roundtrip():
  assert MapperConfig.from_dict(CFG.to_dict()) == CFG
  with pytest.raises(ValueError, match="unknown"):
    MapperConfig.from_dict({"chh": 3})


def test_param_counts(torch_mapper):
  model = latent_mapper.abstract(CFG)
  assert num_params(model) == 1_564_976
  assert num_params(model.convds3) == 4_864
  assert sum(p.numel() for p in torch_mapper.parameters()) == 1_564_976  # torch dedups the alias


def test_official_keys_present(torch_mapper):
  keys = set(torch_mapper.state_dict())
  for k in (
    "input_blocks.weight",
    "conv1_0.resblock.conv1.0.weight",
    "conv1_0.resblock.conv1.1.weight",
    "conv1_0.resblock.act1.weight",
    "conv1_0.resblock.conv1.2.bias",
    "conv2_0.resblock.skip_connection.weight",
    "conv1_0.attention.proj_out.weight",
    "convds0.0.bias",
    "convds0.2.weight",
  ):
    assert k in keys, k
  assert "conv1_0.resblock.skip_connection.weight" not in keys  # 32 -> 32: identity


def test_forward_matches_torch(torch_mapper, checkpoint):
  flat, cfg = conv.load_gms_mapper(checkpoint)
  assert cfg == CFG
  model = _build(flat)
  x = np.random.default_rng(0).normal(size=(1, 28, 28, 4)).astype(np.float32)
  with torch.no_grad():
    ref = torch_mapper(torch_refs.nhwc_to_nchw(x))
  out = nnx.jit(lambda m, z: m(z))(model, jnp.asarray(x))
  assert set(out) == set(HEADS)
  for k in HEADS:
    r = torch_refs.nchw_to_nhwc(ref[k])
    err = float(np.max(np.abs(np.asarray(out[k]) - r)))
    print(f"mapper head {k}: max |flax - torch| = {err:.2e} (|ref| max {np.abs(r).max():.2f})")
    assert err <= 1e-5 * max(1.0, float(np.abs(r).max())), k


def test_forward_matches_torch_float64(torch_mapper):
  """Same comparison in float64: only rounding separates the two, so they agree to ~1e-13."""
  ref_model = copy.deepcopy(torch_mapper).double()
  flat = conv.convert_state_dict(_numpy_sd(ref_model), CFG)
  x = np.random.default_rng(2).normal(size=(1, 28, 28, 4))
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(x).permute(0, 3, 1, 2))
  with jax.enable_x64(True):
    model = _build({k: v.astype(np.float64) for k, v in flat.items()})
    out = nnx.jit(lambda m, z: m(z))(model, jnp.asarray(x))
    errs = {
      k: float(np.max(np.abs(np.asarray(out[k]) - ref[k].permute(0, 2, 3, 1).numpy())))
      for k in HEADS
    }
  print(f"mapper float64 max errors: { {k: f'{e:.1e}' for k, e in errs.items()} }")
  assert out["out"].dtype == jnp.float64 and max(errs.values()) < 1e-10


def test_init_follows_spec():
  """Kaiming-normal (fan_out, leaky_relu gain) convs, zero biases, GN (1, 0), PReLU 0.25.

  Checked on one residual block, one attention and one head (initialising the whole model costs compile time
  for nothing: every block is built by the same code)."""
  rngs = nnx.Rngs(
    jax.random.key(0, impl="unsafe_rbg")
  )  # same law as threefry, far cheaper to compile
  modules = {
    "resblock": ResBlock(256, 128, CFG, rngs=rngs),
    "attention": SpatialSelfAttention(32, CFG, rngs=rngs),
    "convds0": Head(32, 4, CFG, rngs=rngs),
  }
  flat = {f"{name}/{k}": v for name, m in modules.items() for k, v in core.model_to_flat(m).items()}
  k = flat["resblock/conv1/kernel"]  # (3,3,256,128): fan_out = 128*9
  assert k.shape == (3, 3, 256, 128)
  assert abs(k.std() / np.sqrt(2.0 / (128 * 9)) - 1) < 0.02
  assert abs(k.mean()) < 1e-3
  skip = flat["resblock/skip_connection/kernel"]  # 1x1: fan_out = 128
  assert abs(skip.std() / np.sqrt(2.0 / 128) - 1) < 0.05
  assert abs(flat["attention/q/kernel"].std() / np.sqrt(2.0 / 32) - 1) < 0.1
  assert flat["convds0/conv/kernel"].shape == (3, 3, 32, 4) and "convds0/conv/bias" not in flat
  for path, v in flat.items():
    if path.endswith("/bias"):
      assert not v.any(), path
    if re.search(r"act[12]/weight$", path):
      assert v.shape == (1,) and v[0] == np.float32(0.25), path
    if path.endswith("/scale"):
      assert np.all(v == 1.0), path
  assert sum(1 for p in flat if re.search(r"act[12]/weight$", p)) == 2


def test_cli_converter_and_data_parallel_prefix(torch_mapper, checkpoint):
  from gms_jax.convert import convert

  flat, family, config = convert("gms-mapper", checkpoint)
  assert family == "mapper" and MapperConfig.from_dict(config) == CFG
  wrapped = {f"module.{k}": v for k, v in _numpy_sd(torch_mapper).items()}
  got = conv.convert_state_dict(wrapped, conv.infer_config(wrapped))
  assert all(np.array_equal(got[k], flat[k]) for k in flat)


def test_prelu_alias_rules(torch_mapper):
  sd = _numpy_sd(torch_mapper)
  ref = conv.convert_state_dict(sd, CFG)
  # Only one of the two copies present: either works and gives the same params.
  only_alias = {k: v for k, v in sd.items() if not re.search(r"resblock\.conv[12]\.1\.weight$", k)}
  only_seq = {k: v for k, v in sd.items() if not re.search(r"resblock\.act[12]\.weight$", k)}
  for d in (only_alias, only_seq):
    got = conv.convert_state_dict(d, CFG)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)
  bad = dict(sd)
  bad["conv2_2.resblock.act2.weight"] = bad["conv2_2.resblock.act2.weight"] + 0.01
  with pytest.raises(core.ConversionError, match=r"conv2_2\.resblock\.act2\.weight"):
    conv.convert_state_dict(bad, CFG)


def test_strict_errors_name_every_problem(torch_mapper):
  sd = _numpy_sd(torch_mapper)
  del sd["conv3_0.attention.k.bias"]
  sd["conv3_0.attention.extra.weight"] = np.zeros(3, np.float32)
  sd["convds1.2.weight"] = np.zeros((4, 32, 1, 1), np.float32)
  with pytest.raises(core.ConversionError) as e:
    conv.convert_state_dict(sd, CFG, source="best_model.pth")
  msg = str(e.value)
  assert "best_model.pth" in msg
  assert "conv3_0/attention/k/bias" in msg  # missing
  assert "conv3_0.attention.extra.weight" in msg  # unexpected
  assert "convds1.2.weight" in msg  # wrong shape


def test_official_state_dict_inverse_is_exact(torch_mapper):
  """Flax params -> official state dict gives back every torch key and tensor (PReLU twice)."""
  sd = _numpy_sd(torch_mapper)
  back = conv.to_state_dict(conv.convert_state_dict(sd, CFG))
  assert set(back) == set(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k
  assert back["conv1_0.resblock.act1.weight"] is back["conv1_0.resblock.conv1.1.weight"]
