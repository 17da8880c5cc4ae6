"""The GMS loss (gms_jax.loss) against a PyTorch reference of the same loss, same weights."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gms_jax import loss as loss_lib
from gms_jax import tokenizers
from gms_jax.convert import mapper as mapper_conv
from gms_jax.convert import sd_vae as vae_conv
from gms_jax.convert.core import apply_flat
from gms_jax.models.latent_mapper import MapperConfig, ResAttnUNet_DS
from gms_jax.models.sd_vae import AutoencoderKLConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
torch_refs = pytest.importorskip("gms_jax.testing.torch_refs")

VAE = AutoencoderKLConfig.tiny()  # /2: 16x16 images -> 8x8x4 latents
MAPPER = MapperConfig(ch=16)
B, S = 3, 16


def test_dice_loss_is_monai_default():
  rng = np.random.default_rng(0)
  p = rng.uniform(size=(4, 8, 8)).astype(np.float32)
  g = (rng.uniform(size=(4, 8, 8)) > 0.6).astype(np.float32)
  g[1] = 0.0  # an empty target: (0 + 1e-5) / (sum p + 1e-5)
  inter, denom = (p * g).sum((1, 2)), p.sum((1, 2)) + g.sum((1, 2))
  want = np.mean(1.0 - (2.0 * inter + 1e-5) / (denom + 1e-5))
  np.testing.assert_allclose(float(loss_lib.dice_loss(p, g)), want, rtol=1e-6)
  assert float(loss_lib.dice_loss(g, g)) < 1e-6  # perfect prediction


# ----------------------------------------------------------------------------- torch reference


def _torch_models(seed=0):
  n = len(VAE.block_out_channels)
  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * n,
    up_block_types=("UpDecoderBlock2D",) * n,
    block_out_channels=VAE.block_out_channels,
    layers_per_block=VAE.layers_per_block,
    latent_channels=VAE.latent_channels,
    norm_num_groups=VAE.norm_num_groups,
    scaling_factor=VAE.scaling_factor,
  )
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.05)
      elif p.ndim == 1:  # GroupNorm scale
        p.normal_(1.0, 0.1)
      elif re.search(r"decoder\.conv_out\.weight", name):
        p.mul_(0.3)  # keep most decoded pixels inside (-1, 1): the clip is not everything
  mapper = torch_refs.randomize_(
    torch_refs.ResAttnUNet_DS(in_channel=4, out_channels=4, ch=MAPPER.ch), seed=seed
  )
  with torch.no_grad():
    for name, p in mapper.named_parameters():
      if re.fullmatch(r"convds\d\.2\.weight", name):
        p.mul_(0.1)  # head outputs of the order of real latents, so the loss is O(1)
  return vae.eval(), mapper.eval()


def _dice_torch(pred, target, smooth=1e-5):
  """MONAI DiceLoss() with its defaults, written out: reduce over H,W per (sample, channel)."""
  inter = torch.sum(pred * target, dim=(2, 3))
  denom = torch.sum(pred, dim=(2, 3)) + torch.sum(target, dim=(2, 3))
  return torch.mean(1.0 - (2.0 * inter + smooth) / (denom + smooth))


@torch.no_grad()
def _torch_loss(vae, mapper, images, masks, apply_noise, eps, heads=loss_lib.HEADS):
  """The original training loss (docs/METHOD.md §3), NCHW torch (values only)."""
  scale = VAE.scaling_factor
  img = torch_refs.nhwc_to_nchw(images)
  mask_rgb = torch.from_numpy(masks)[:, None].repeat(1, 3, 1, 1)
  grey = mask_rgb.mean(dim=1, keepdim=True)
  post = vae.encode(img * 2 - 1).latent_dist
  z = post.mean * scale
  if apply_noise:
    z = z + post.std * torch_refs.nhwc_to_nchw(eps)  # unscaled std, as the original
  z_mask = vae.encode(mask_rgb * 2 - 1).latent_dist.mean * scale
  out = mapper(z)
  rec = sum(torch.nn.functional.mse_loss(out[k], z_mask) for k in heads)
  dice = 0.0
  for k in heads:
    dec = vae.decode(out[k] / scale).sample.mean(dim=1, keepdim=True)
    dice = dice + _dice_torch(torch.clamp((dec + 1) / 2, 0, 1), grey)
  return float(rec + dice), float(rec), float(dice)


@pytest.fixture(scope="module")
def case():
  vae, mapper = _torch_models()
  sd = {k: v.detach().numpy().copy() for k, v in vae.state_dict().items()}
  tok = tokenizers.from_flat("sd-vae", vae_conv.convert_state_dict(sd, VAE), VAE)
  msd = {k: v.detach().numpy().copy() for k, v in mapper.state_dict().items()}
  model = nnx.eval_shape(lambda: ResAttnUNet_DS(MAPPER, rngs=nnx.Rngs(0)))
  apply_flat(model, mapper_conv.convert_state_dict(msd, MAPPER))
  graphdef, state = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(B, S, S, 3)).astype(np.float32)
  masks = np.zeros((B, S, S), np.float32)
  masks[0, 4:12, 3:10] = 1.0
  masks[1, :6, :] = 1.0  # masks[2] stays empty
  eps = rng.standard_normal((B, S // 2, S // 2, 4)).astype(np.float32)

  @jax.jit
  def jax_losses(params, tok_params, images, masks, apply, eps):
    kw = dict(apply_noise=apply, eps=eps)
    batched = loss_lib.gms_loss(graphdef, params, tok, tok_params, images, masks, **kw)
    per_head = loss_lib.gms_loss(
      graphdef, params, tok, tok_params, images, masks, batch_decode=False, batch_encode=False, **kw
    )
    return batched, per_head  # per_head: also images and masks encoded in separate calls

  return dict(
    vae=vae,
    mapper=mapper,
    tok=tok,
    params=nnx.to_pure_dict(state),
    images=images,
    masks=masks,
    eps=eps,
    jax_losses=jax_losses,
  )


@pytest.mark.parametrize("apply_noise", [False, True])
def test_loss_matches_torch_reference(case, apply_noise):
  c = case
  want, want_rec, want_dice = _torch_loss(
    c["vae"], c["mapper"], c["images"], c["masks"], apply_noise, c["eps"]
  )
  (got, terms), (got_ph, _) = c["jax_losses"](
    c["params"], c["tok"].params, c["images"], c["masks"], jnp.asarray(apply_noise), c["eps"]
  )
  print(
    f"\n[loss noise={apply_noise}] torch {want:.7f} (rec {want_rec:.6f}, dice {want_dice:.6f})"
    f" jax {float(got):.7f} per-head {float(got_ph):.7f}"
  )
  assert want_rec > 1e-3 and 0.05 < want_dice < 2.95  # neither term is trivial
  assert abs(float(terms["rec"]) - want_rec) <= 1e-5
  assert abs(float(terms["dice"]) - want_dice) <= 1e-5
  assert abs(float(got) - want) <= 1e-5
  assert abs(float(got_ph) - float(got)) <= 1e-6  # batched calls == per-head / per-input calls
  assert float(terms["noise"]) == float(apply_noise)


def test_noise_is_one_draw_per_batch():
  rng = jax.random.PRNGKey(0)
  draws = [
    bool(loss_lib.sample_latent_noise(jax.random.fold_in(rng, i), (2, 2, 2, 4), 0.5)[0])
    for i in range(64)
  ]
  assert 16 < sum(draws) < 48  # p = 0.5, one Bernoulli per batch (a scalar)
  apply, eps = loss_lib.sample_latent_noise(rng, (2, 2, 2, 4), 0.5)
  assert apply.shape == () and eps.shape == (2, 2, 2, 4)


def test_batch_decode_config_resolution():
  from gms_jax import step as step_lib

  assert step_lib.resolve_batch_decode("auto", "cpu") is False
  assert step_lib.resolve_batch_decode("auto", "gpu") is True
  assert step_lib.resolve_batch_decode("auto", "tpu") is True
  assert step_lib.resolve_batch_decode("false", "gpu") is False
  assert step_lib.resolve_batch_decode(True, "cpu") is True
  with pytest.raises(ValueError, match="batch_decode"):
    step_lib.resolve_batch_decode("sometimes", "cpu")
  from _train_helpers import load_config

  cfg = load_config("sample")
  assert cfg.loss.batch_decode == cfg.loss.batch_encode == "auto"
  kw = step_lib.loss_kwargs(cfg, "cpu")
  assert kw["batch_decode"] is False and kw["batch_encode"] is False
  cfg.loss.batch_encode = "true"
  assert step_lib.loss_kwargs(cfg, "cpu")["batch_encode"] is True
  assert step_lib.loss_kwargs(cfg, "gpu")["batch_decode"] is True
  cfg.loss.batch_encode = "never"
  with pytest.raises(ValueError, match="batch_encode"):
    step_lib.loss_kwargs(cfg, "cpu")
