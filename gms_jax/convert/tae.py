"""Key map: TAESD-family ``*_encoder.pth`` / ``*_decoder.pth`` -> :mod:`gms_jax.models.tae`.

The two files are plain ``nn.Sequential`` state dicts; :func:`load_tae` prefixes their keys with
``encoder.`` / ``decoder.`` (as the ``TAESD`` wrapper module's own state dict would) and
:func:`convert_state_dict` takes that combined dict.  Sequential indices map one-to-one onto the
Flax layer lists; inside a block ``conv.{0,2,4}`` -> ``conv{1,2,3}``, ``skip`` -> ``skip``,
``pool.{0,1,3}`` -> ``pool/{conv_in,norm,conv_out}``.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from typing import Mapping

import numpy as np
from flax import nnx

from gms_jax.convert import core
from gms_jax.models.tae import TAE, TAEConfig

FAMILY = "tae"

_CONV = {"weight": "kernel", "bias": "bias"}
_BLOCK_CONV = {"0": "conv1", "2": "conv2", "4": "conv3"}


def key_map(key: str) -> str:
  """``encoder.11.pool.1.weight`` -> ``encoder/layers/11/pool/norm/scale`` etc.; ``KeyError`` otherwise."""
  m = re.fullmatch(r"(encoder|decoder)\.(\d+)\.(.+)", key)
  if not m:
    raise KeyError(key)
  side, idx, rest = m.groups()
  pre = f"{side}/layers/{idx}"
  if rest in _CONV:
    return f"{pre}/{_CONV[rest]}"
  m = re.fullmatch(r"conv\.([024])\.(weight|bias)", rest)
  if m:
    return f"{pre}/{_BLOCK_CONV[m[1]]}/{_CONV[m[2]]}"
  if rest == "skip.weight":
    return f"{pre}/skip/kernel"
  if rest in ("pool.0.weight", "pool.3.weight"):
    return f"{pre}/pool/{'conv_in' if rest[5] == '0' else 'conv_out'}/kernel"
  if rest in ("pool.1.weight", "pool.1.bias"):
    return f"{pre}/pool/norm/{'scale' if rest.endswith('weight') else 'bias'}"
  raise KeyError(key)


@functools.lru_cache(maxsize=8)
def _target_shapes(cfg: TAEConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
  abstract = nnx.eval_shape(lambda: TAE(cfg, rngs=nnx.Rngs(0)))
  return tuple(core.flat_shapes(nnx.state(abstract, nnx.Param)).items())


def target_shapes(cfg: TAEConfig) -> dict[str, tuple[int, ...]]:
  """Flax path -> shape of ``TAE(cfg)``, without allocating it (cached per config)."""
  return dict(_target_shapes(cfg))


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray], cfg: TAEConfig, *, source: str = "checkpoint"
) -> dict[str, np.ndarray]:
  """``{encoder.*, decoder.*}`` torch state dict -> flat Flax params of ``TAE(cfg)`` (strict)."""
  return core.strict_convert(state_dict, key_map, target_shapes(cfg), source=source)


def infer_config(state_dict: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> TAEConfig:
  """Latent channels from the encoder's last / decoder's first conv; midblock GN from ``pool`` keys."""
  try:
    enc_out = state_dict["encoder.14.weight"].shape[0]
    dec_in = state_dict["decoder.1.weight"].shape[1]
    width = state_dict["encoder.0.weight"].shape[0]
  except KeyError as e:
    raise core.ConversionError(f"{source}: not a TAESD-family state dict: no {e.args[0]!r}") from e
  if enc_out != dec_in:
    raise core.ConversionError(
      f"{source}: encoder emits {enc_out} latent channels but the decoder takes {dec_in}"
    )
  enc_gn = any(re.match(r"encoder\.\d+\.pool\.", k) for k in state_dict)
  dec_gn = any(re.match(r"decoder\.\d+\.pool\.", k) for k in state_dict)
  if enc_gn != dec_gn:
    raise core.ConversionError(f"{source}: midblock GN in encoder={enc_gn} but decoder={dec_gn}")
  return TAEConfig(latent_channels=int(enc_out), midblock_gn=enc_gn, channels=int(width))


def read_pair(encoder_path: str, decoder_path: str) -> dict[str, np.ndarray]:
  """Both files -> one state dict with ``encoder.`` / ``decoder.`` prefixes."""
  sd = {}
  for side, path in (("encoder", encoder_path), ("decoder", decoder_path)):
    sd.update({f"{side}.{k}": v for k, v in core.load_torch_file(path).items()})
  return sd


def find_pair(folder: str) -> tuple[str, str]:
  """``(encoder, decoder)`` weight files in ``folder``: ``taef2_*.pth`` if present, else the one
  ``*encoder.{pth,safetensors}`` / ``*decoder.{pth,safetensors}`` pair."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: not a directory (expected *_encoder.pth and *_decoder.pth)")
  preferred = [os.path.join(folder, f"taef2_{s}.pth") for s in ("encoder", "decoder")]
  if all(os.path.isfile(p) for p in preferred):
    return preferred[0], preferred[1]
  found = {}
  for side in ("encoder", "decoder"):
    found[side] = sorted(
      p for ext in ("pth", "safetensors") for p in glob.glob(os.path.join(folder, f"*{side}.{ext}"))
    )
  if len(found["encoder"]) != 1 or len(found["decoder"]) != 1:
    raise FileNotFoundError(
      f"{folder}: expected exactly one *encoder and one *decoder weight file, "
      f"found {found['encoder'] + found['decoder'] or 'none'}"
    )
  return found["encoder"][0], found["decoder"][0]


def load_tae(encoder_path: str, decoder_path: str) -> tuple[dict[str, np.ndarray], TAEConfig]:
  """Reads a TAESD-family encoder/decoder pair -> ``(flat params, cfg)``; cfg is inferred."""
  sd = read_pair(encoder_path, decoder_path)
  source = f"{os.path.basename(encoder_path)}+{os.path.basename(decoder_path)}"
  cfg = infer_config(sd, source=source)
  return convert_state_dict(sd, cfg, source=source), cfg


def load(path: str, *, cfg: TAEConfig | None = None) -> tuple[dict[str, np.ndarray], TAEConfig]:
  """The family loader (:data:`gms_jax.tokenizers.REGISTRY`): a folder with an encoder/decoder
  pair (:func:`find_pair`); ``cfg``, when given, must be what the weights hold."""
  if os.path.isfile(path) and path.endswith(".safetensors"):
    core.load_torch_file(path)  # a truncated or corrupt file: "not a readable safetensors file"
    raise core.ConversionError(
      f"{path}: a .safetensors file without gms_jax metadata; convert the TAE weights first "
      "(gms-jax convert --format tae FOLDER OUT.safetensors)"
    )
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"{path}: expected a folder with taef2_encoder.pth/taef2_decoder.pth (or one *encoder / "
      "*decoder pair) or a converted gms_jax .safetensors"
    )
  flat, got = load_tae(*find_pair(path))
  if cfg is not None and cfg != got:
    raise core.ConversionError(f"{path}: the given config {cfg} contradicts the weights ({got})")
  return flat, got
