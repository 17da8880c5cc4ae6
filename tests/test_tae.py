"""TAEF2 (real weights): Flax vs the torch reference, and reconstruction quality on real images.

Needs the original TAEF2 ``.pth`` files and real BUSI images, which are not part of the repository
(looked for at ``SHARED`` below); skips with a reason without them.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gms_jax import tokenizers
from gms_jax.convert import core
from gms_jax.convert import tae as conv
from gms_jax.models.tae import TAEConfig

torch = pytest.importorskip("torch")
from gms_jax.testing import torch_refs  # noqa: E402  (needs torch)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "taef2"
DATA = SHARED / "data"
if not (WEIGHTS / "taef2_encoder.pth").is_file() or not (DATA / "busi" / "images").is_dir():
  pytest.skip(f"real TAEF2 weights / data not found under {SHARED}", allow_module_level=True)

PSNR_FLOOR_EACH = 28.0  # measured 30.8 .. 36.4 dB on these images (see test output)
PSNR_FLOOR_MEAN = 30.0  # measured mean 33.5 dB; broken ports measured at <= 20 dB


def _image(path, size=224):
  from PIL import Image

  with Image.open(path) as im:
    return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255.0


@pytest.fixture(scope="module")
def images():
  files = (
    sorted((DATA / "busi" / "images").glob("*.png"))[:2]
    + sorted((DATA / "ph2" / "images").glob("*.png"))[:2]
  )
  assert len(files) == 4
  return np.stack([_image(f) for f in files])


@pytest.fixture(scope="module")
def tok():
  return tokenizers.load("taef2", str(WEIGHTS))


@pytest.fixture(scope="module")
def run():
  """``run(tok, params, x) -> (z, raw decoder output of z)``, one compile per graph (params are args).

  The raw (unclipped) output is what the torch decoder returns; ``clip`` of it is ``tok.decode``."""
  cache = {}

  def run_(t, params, x):
    if t.graphdef not in cache:

      def fn(p, x):
        z = t.encode(p, x).z
        return z, nnx.merge(t.graphdef, p).decode(z)

      cache[t.graphdef] = jax.jit(fn)
    return tuple(map(np.asarray, cache[t.graphdef](params, x)))

  return run_


@pytest.fixture(scope="module")
def outputs(tok, images, run):
  """``(z, raw decoder output)`` of the real TAEF2 on the four images (computed once)."""
  return run(tok, tok.params, images)


def _psnr(y, x):
  mse = ((y - x) ** 2).reshape(len(x), -1).mean(axis=1)
  return 10 * np.log10(1.0 / mse)


def test_config_inferred_from_weights():
  sd = conv.read_pair(str(WEIGHTS / "taef2_encoder.pth"), str(WEIGHTS / "taef2_decoder.pth"))
  assert conv.infer_config(sd) == TAEConfig.taef2()
  assert TAEConfig.from_dict(TAEConfig.taef2().to_dict()) == TAEConfig.taef2()
  flat = conv.convert_state_dict(sd, TAEConfig.taef2())
  assert sum(v.size for v in flat.values()) == sum(v.size for v in sd.values()) == 2_677_027
  with pytest.raises(
    core.ConversionError, match=r"unexpected \(24\)"
  ):  # plain variant: 24 pool keys
    conv.convert_state_dict(sd, TAEConfig(latent_channels=32, midblock_gn=False))


def test_matches_torch_reference(images, outputs):
  enc = torch_refs.tae_encoder(32, use_midblock_gn=True).eval()
  dec = torch_refs.tae_decoder(32, use_midblock_gn=True).eval()
  for module, name in ((enc, "encoder"), (dec, "decoder")):
    sd = torch.load(WEIGHTS / f"taef2_{name}.pth", map_location="cpu", weights_only=True)
    module.load_state_dict({k: v.float() for k, v in sd.items()})
  z, y = outputs
  i = 2  # a PH2 image, 224x224; torch decodes the *Flax* latent so the decoder is compared alone
  with torch.no_grad():
    z_ref = torch_refs.nchw_to_nhwc(enc(torch_refs.nhwc_to_nchw(images[i : i + 1])))
    y_ref = torch_refs.nchw_to_nhwc(dec(torch_refs.nhwc_to_nchw(z[i : i + 1])))
  assert z.shape == (4, 28, 28, 32) and y.shape == (4, 224, 224, 3)
  ez, ey = float(np.abs(z[i : i + 1] - z_ref).max()), float(np.abs(y[i : i + 1] - y_ref).max())
  print(
    f"\nTAEF2 224x224: encoder max err {ez:.2e} (|z| max {np.abs(z_ref).max():.2f}), "
    f"decoder max err {ey:.2e}; decoder output range [{y_ref.min():.3f}, {y_ref.max():.3f}]"
  )
  assert ez <= 1e-4 and ey <= 1e-4


def test_reconstruction_psnr(images, outputs):
  psnr = _psnr(np.clip(outputs[1], 0, 1), images)
  print(
    f"\nTAEF2 encode->decode PSNR (BUSI x2, PH2 x2, 224x224): {np.round(psnr, 2)} dB, "
    f"mean {psnr.mean():.2f}"
  )
  assert psnr.min() >= PSNR_FLOOR_EACH and psnr.mean() >= PSNR_FLOOR_MEAN


def test_broken_ports_fall_below_floor(tok, images, run):
  """The floor is meaningful: a zeroed conv or 'SAME' stride-2 padding fails it."""
  model = nnx.merge(tok.graphdef, tok.params, copy=True)  # copy: never mutate tok.params
  pool_out = model.encoder.layers[12].pool.conv_out.kernel
  pool_out[...] = jnp.zeros_like(pool_out[...])
  _, zeroed = nnx.split(model, nnx.Param)
  psnr_zero = _psnr(np.clip(run(tok, zeroed, images)[1], 0, 1), images)

  model = nnx.merge(tok.graphdef, tok.params, copy=True)
  for i in (2, 6, 10):  # stride-2 convs: 'SAME' pads (0, 1) at 224, torch pads (1, 1)
    model.encoder.layers[i].padding = "SAME"
  bad = tokenizers.from_model("tae", model)
  psnr_same = _psnr(np.clip(run(bad, bad.params, images)[1], 0, 1), images)
  print(
    f"\nbroken ports: zeroed encoder.12.pool.3 -> mean {psnr_zero.mean():.2f} dB, "
    f"'SAME' stride-2 padding -> mean {psnr_same.mean():.2f} dB"
  )
  assert psnr_zero.mean() < PSNR_FLOOR_MEAN and psnr_same.mean() < PSNR_FLOOR_MEAN
  assert np.any(np.asarray(tok.params["encoder"]["layers"][12]["pool"]["conv_out"]["kernel"][...]))
