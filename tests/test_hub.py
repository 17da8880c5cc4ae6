"""``hf:`` tokenizer ids against a Hugging Face cache the test lays out itself (no network).

The cache has the layout ``huggingface_hub`` reads: ``models--OWNER--REPO/refs/<revision>`` holding
the commit hash and ``snapshots/<commit>/<files>``. ``HF_HUB_OFFLINE`` is on throughout.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from flax import nnx

from gms_jax import cli, errors, pretrained, tokenizers
from gms_jax.convert import hub
from gms_jax.convert import sd_vae as conv_sd
from gms_jax.convert import tae as conv_tae
from gms_jax.models.sd_vae import AutoencoderKLConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
huggingface_hub = pytest.importorskip("huggingface_hub")
from gms_jax.testing import torch_refs  # noqa: E402  (needs torch)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
VAE_CFG = AutoencoderKLConfig(
  block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, scaling_factor=0.13025
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
  root = tmp_path / "hub"
  root.mkdir()
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  return root


def _snapshot(cache, repo: str, revision: str = "main"):
  base = cache / f"models--{repo.replace('/', '--')}"
  (base / "refs").mkdir(parents=True, exist_ok=True)
  (base / "refs" / revision).write_text(COMMIT)
  snap = base / "snapshots" / COMMIT
  snap.mkdir(parents=True, exist_ok=True)
  return snap


def _umask():
  m = os.umask(0)
  os.umask(m)
  return m


def test_parse():
  assert hub.parse("hf:stabilityai/sd-vae-ft-mse") == ("stabilityai/sd-vae-ft-mse", None, "")
  assert hub.parse("hf:stabilityai/stable-diffusion-2@v1.0/vae") == (
    "stabilityai/stable-diffusion-2",
    "v1.0",
    "vae",
  )
  assert hub.parse("hf:org/repo/sub/dir") == ("org/repo", None, "sub/dir")
  assert hub.family_of("hf:madebyollin/taesdxl") == "tae"
  with pytest.raises(errors.ConfigError, match="hf:OWNER/REPO"):
    hub.parse("hf:just-a-name")


def test_diffusers_vae_in_a_subfolder(cache):
  torch.manual_seed(0)
  n = len(VAE_CFG.block_out_channels)
  vae = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * n,
    up_block_types=("UpDecoderBlock2D",) * n,
    block_out_channels=VAE_CFG.block_out_channels,
    layers_per_block=VAE_CFG.layers_per_block,
    latent_channels=VAE_CFG.latent_channels,
    scaling_factor=VAE_CFG.scaling_factor,
  )
  snap = _snapshot(cache, "someorg/tiny-sd")
  vae.save_pretrained(snap / "vae")
  want, _ = conv_sd.load_diffusers(str(snap / "vae"))
  # with the subfolder, at a revision, and as a pipeline repository (the VAE found in vae/)
  for spec in ("hf:someorg/tiny-sd/vae", f"hf:someorg/tiny-sd@{COMMIT}/vae", "hf:someorg/tiny-sd"):
    tok = tokenizers.load("sd-vae", spec)
    assert tok.family == "sd-vae" and tok.scale == pytest.approx(0.13025)  # from config.json
    assert tok.config == VAE_CFG
    got = {
      "/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(tok.params)
    }
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
  converted = snap / "vae" / "gms_jax-sd-vae.safetensors"
  assert converted.is_file() and (os.stat(converted).st_mode & 0o777) == 0o666 & ~_umask()
  assert tokenizers.load("sd-vae", "hf:someorg/tiny-sd/vae", scaling_factor=0.2).scale == 0.2


def _taesd_snapshot(cache, seed=0):
  snap = _snapshot(cache, "madebyollin/taesd")
  enc = torch_refs.randomize_(torch_refs.tae_encoder(4), seed=seed)
  dec = torch_refs.randomize_(torch_refs.tae_decoder(4), seed=seed + 1)
  torch.save(enc.state_dict(), snap / "taesd_encoder.pth")
  torch.save(dec.state_dict(), snap / "taesd_decoder.pth")
  return snap


def test_taesd_id_converts_once_then_needs_no_torch(cache, monkeypatch):
  snap = _taesd_snapshot(cache)
  want, cfg = conv_tae.load_tae(str(snap / "taesd_encoder.pth"), str(snap / "taesd_decoder.pth"))
  tok = tokenizers.load("taesd", "hf:madebyollin/taesd")
  assert tok.family == "tae" and tok.latent_channels == 4 and tok.config == cfg
  assert (snap / "gms_jax-tae.safetensors").is_file()
  flat = lambda t: {
    "/".join(map(str, k)): np.asarray(v.get_value())  # noqa: E731
    for k, v in nnx.to_flat_state(t.params)
  }
  assert all(np.array_equal(flat(tok)[k], want[k]) for k in want)
  monkeypatch.setitem(sys.modules, "torch", None)  # the second start reads the converted file
  again = tokenizers.load("taesd", "hf:madebyollin/taesd")
  assert all(np.array_equal(flat(again)[k], want[k]) for k in want)


def test_family_mismatch_is_named(cache):
  _taesd_snapshot(cache)
  with pytest.raises(errors.ConfigError, match="tokenizer.name=taesd"):
    tokenizers.load("sd-vae", "hf:madebyollin/taesd")


def test_offline_empty_cache_error_is_one_line(cache):
  with pytest.raises(FileNotFoundError) as e:
    tokenizers.load("sd-vae", "hf:stabilityai/sd-vae-ft-mse")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("hf:stabilityai/sd-vae-ft-mse: ")
  assert "HF_HUB_OFFLINE=1" in msg and "`hf download stabilityai/sd-vae-ft-mse`" in msg


def test_offline_error_through_import_cli(cache, tmp_path, capsys):
  """What a user sees: `gms-jax import` with an hf: tokenizer that is not cached, offline."""
  model = torch_refs.ResAttnUNet_DS(4, 4, 16, (1, 2, 4, 4))
  mapper = str(tmp_path / "m.safetensors")
  pretrained.save_official(
    {k: v.detach().numpy() for k, v in model.state_dict().items()}, mapper, "safetensors"
  )
  config = os.path.join(os.path.dirname(__file__), "..", "configs", "gms.py")
  rc = cli.main(
    [
      "import",
      "--config",
      f"{config}:sample",
      "--config.tokenizer.path=hf:stabilityai/sd-vae-ft-mse@main/vae",
      "--mapper",
      mapper,
      "--workdir",
      str(tmp_path / "wd"),
    ]
  )
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert "hf:stabilityai/sd-vae-ft-mse@main/vae" in err
  assert "hf download stabilityai/sd-vae-ft-mse --revision main --include 'vae/*'" in err
  assert not (tmp_path / "wd").exists()
