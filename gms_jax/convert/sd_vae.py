"""Key maps: SD VAE checkpoints (diffusers, old diffusers attention names, LDM/CompVis) → Flax.

The Flax paths of :mod:`gms_jax.models.sd_vae` mirror LDM, so every naming is first rewritten to
LDM names and then to a Flax path.  Which naming a state dict uses is detected from its keys:

- diffusers: ``encoder.down_blocks.{i}.resnets.{j}``, ``downsamplers.0.conv``,
  ``mid_block.resnets.{0,1}``, ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``
  (older files: ``query,key,value,proj_attn``), ``conv_shortcut``, ``conv_norm_out``,
  ``decoder.up_blocks.{i}`` with ``up_blocks.0`` the deepest;
- LDM: ``encoder.down.{i}.block.{j}``, ``nin_shortcut``, ``mid.{block_1,attn_1,block_2}``,
  ``norm_out``, ``decoder.up.{i}`` with ``up.{n-1}`` the deepest; an optional
  ``first_stage_model.`` (or ``vae.``) prefix, in which case keys outside it (the rest of a full
  Stable Diffusion checkpoint) are ignored; ``loss.*`` and ``model_ema.*`` are always ignored.

Conversion is strict (:func:`gms_jax.convert.core.strict_convert`): one error lists every missing,
unexpected and mis-shaped key.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from gms_jax.convert import core
from gms_jax.models.sd_vae import AutoencoderKL, AutoencoderKLConfig

FAMILY = "sd-vae"
ConversionError = core.ConversionError

_LDM_PREFIXES = ("first_stage_model.", "vae.")
_IGNORED_PREFIXES = ("loss.", "model_ema.")
_NORMS = {"norm1", "norm2", "norm", "norm_out"}
_ATTN_DIFFUSERS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                   "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_RESNET_DIFFUSERS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                     "conv_shortcut": "nin_shortcut"}
_RESNET_LDM = {"norm1", "conv1", "norm2", "conv2", "nin_shortcut"}
_ATTN_LDM = {"norm", "q", "k", "v", "proj_out"}


def target_shapes(cfg: AutoencoderKLConfig) -> dict[str, tuple[int, ...]]:
  """Flax path → shape of the model's params (abstract: nothing is allocated)."""
  return dict(_target_shapes(cfg))


@functools.lru_cache(maxsize=8)
def _target_shapes(cfg: AutoencoderKLConfig) -> dict[str, tuple[int, ...]]:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  return core.flat_shapes(nnx.state(model, nnx.Param))


# ----------------------------------------------------------------------------- key maps


def _leaf(module_path: str, param: str) -> str:
  """LDM module path + torch param name → Flax path."""
  last = module_path.rsplit(".", 1)[-1]
  if param == "weight":
    param = "scale" if last in _NORMS else "kernel"
  elif param != "bias":
    raise KeyError(param)
  return module_path.replace(".", "/") + "/" + param


def _ldm_module(mod: str) -> str:
  """Validates an LDM module path (no prefix); raises KeyError if it is not a VAE module."""
  m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)", mod)
  if m or mod in ("quant_conv", "post_quant_conv"):
    return mod
  m = re.fullmatch(r"encoder\.down\.\d+\.(block\.\d+\.(\w+)|downsample\.conv)", mod)
  if m and (m.group(2) is None or m.group(2) in _RESNET_LDM):
    return mod
  m = re.fullmatch(r"decoder\.up\.\d+\.(block\.\d+\.(\w+)|upsample\.conv)", mod)
  if m and (m.group(2) is None or m.group(2) in _RESNET_LDM):
    return mod
  m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_[12]\.(\w+)|attn_1\.(\w+))", mod)
  if m and (m.group(3) in _RESNET_LDM or m.group(4) in _ATTN_LDM):
    return mod
  raise KeyError(mod)


def _diffusers_module(mod: str, n_levels: int) -> str:
  """diffusers module path → LDM module path; raises KeyError if unknown."""
  m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)", mod)
  if m:
    return f"{m.group(1)}.{'norm_out' if m.group(2) == 'conv_norm_out' else m.group(2)}"
  if mod in ("quant_conv", "post_quant_conv"):
    return mod
  m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)\.(\w+)|downsamplers\.0\.conv)", mod)
  if m:
    i = m.group(1)
    if m.group(3) is None:
      return f"encoder.down.{i}.downsample.conv"
    return f"encoder.down.{i}.block.{m.group(3)}.{_RESNET_DIFFUSERS[m.group(4)]}"
  m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)\.(\w+)|upsamplers\.0\.conv)", mod)
  if m:
    i = n_levels - 1 - int(m.group(1))
    if i < 0:
      raise KeyError(mod)
    if m.group(3) is None:
      return f"decoder.up.{i}.upsample.conv"
    return f"decoder.up.{i}.block.{m.group(3)}.{_RESNET_DIFFUSERS[m.group(4)]}"
  m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)", mod)
  if m:
    return f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{_RESNET_DIFFUSERS[m.group(3)]}"
  m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)", mod)
  if m:
    return f"{m.group(1)}.mid.attn_1.{_ATTN_DIFFUSERS[m.group(2)]}"
  raise KeyError(mod)


def detect_naming(keys) -> str:
  """``"diffusers"`` or ``"ldm"`` from the key names (raises ConversionError if neither)."""
  keys = list(keys)
  if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in keys):
    return "diffusers"
  if any(re.search(r"(^|\.)(encoder|decoder)\.(down|up|mid)\.", k) for k in keys):
    return "ldm"
  raise ConversionError(
      "cannot tell the checkpoint's naming (no diffusers 'down_blocks/up_blocks/mid_block' and no "
      f"LDM 'encoder.down/decoder.up/mid' keys); first keys: {keys[:5]}")


def make_key_map(naming: str, cfg: AutoencoderKLConfig, *, prefix: str = ""):
  """torch key → Flax path (``None``: ignore; ``KeyError``: unexpected) for one naming."""
  n_levels = len(cfg.block_out_channels)

  def key_map(key: str) -> str | None:
    if prefix:
      if not key.startswith(prefix):
        return None  # another part of a full LDM checkpoint (unet, text encoder, ...)
      key = key[len(prefix):]
    if key.startswith(_IGNORED_PREFIXES):
      return None
    if "." not in key:
      raise KeyError(key)
    mod, param = key.rsplit(".", 1)
    if naming == "diffusers":
      return _leaf(_diffusers_module(mod, n_levels), param)
    return _leaf(_ldm_module(mod), param)

  return key_map


def _squeeze_conv1d(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Some converted files store attention projections as (out,in,1) conv1d weights."""
  out = {}
  for k, v in state_dict.items():
    v = np.asarray(v)
    out[k] = v[..., 0] if v.ndim == 3 and v.shape[-1] == 1 else v
  return out


def convert_state_dict(state_dict: Mapping[str, Any], cfg: AutoencoderKLConfig, *,
                       source: str = "checkpoint") -> dict[str, np.ndarray]:
  """Any supported SD VAE state dict (torch tensors or numpy) → flat Flax params for ``cfg``."""
  sd = {}
  for k, v in state_dict.items():
    if hasattr(v, "detach"):  # a torch tensor
      v = v.detach().float().cpu().numpy()
    sd[k] = v
  sd = _squeeze_conv1d(sd)
  prefix = next((p for p in _LDM_PREFIXES if any(k.startswith(p) for k in sd)), "")
  naming = detect_naming(k[len(prefix):] for k in sd if k.startswith(prefix))
  return core.strict_convert(sd, make_key_map(naming, cfg, prefix=prefix), target_shapes(cfg),
                             source=f"{source} ({naming} naming)")


# ----------------------------------------------------------------------------- configs and files


def config_from_diffusers_json(d: Mapping[str, Any]) -> AutoencoderKLConfig:
  """A diffusers ``AutoencoderKL`` ``config.json`` dict → :class:`AutoencoderKLConfig`.

  Raises ConversionError for variants this model does not implement (no quant convs, no mid
  attention, other block types or activation, a latent shift).
  """
  cls = d.get("_class_name", "AutoencoderKL")
  problems = []
  if cls != "AutoencoderKL":
    problems.append(f"_class_name={cls!r} (expected 'AutoencoderKL')")
  for key, want in (("act_fn", "silu"), ("use_quant_conv", True), ("use_post_quant_conv", True),
                    ("mid_block_add_attention", True)):
    if key in d and d[key] != want:
      problems.append(f"{key}={d[key]!r} (only {want!r} is supported)")
  if d.get("shift_factor") not in (None, 0, 0.0):
    problems.append(f"shift_factor={d['shift_factor']!r} (only none is supported)")
  for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    if any(t != want for t in d.get(key, ())):
      problems.append(f"{key}={d[key]!r} (only {want} is supported)")
  if problems:
    raise ConversionError("unsupported diffusers AutoencoderKL config: " + "; ".join(problems))
  default = AutoencoderKLConfig()
  return AutoencoderKLConfig(
      in_channels=int(d.get("in_channels", default.in_channels)),
      out_channels=int(d.get("out_channels", default.out_channels)),
      block_out_channels=tuple(d.get("block_out_channels", default.block_out_channels)),
      layers_per_block=int(d.get("layers_per_block", default.layers_per_block)),
      latent_channels=int(d.get("latent_channels", default.latent_channels)),
      norm_num_groups=int(d.get("norm_num_groups", default.norm_num_groups)),
      scaling_factor=float(d.get("scaling_factor") or default.scaling_factor),
  )


_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_diffusers(path: str, *, cfg: AutoencoderKLConfig | None = None
                   ) -> tuple[dict[str, np.ndarray], AutoencoderKLConfig]:
  """A diffusers VAE folder (``config.json`` + weights; a pipeline folder with ``vae/`` works too)
  or a bare weights file → ``(flat params, config)``.

  A bare file gets ``cfg`` or, by default, the SD config (SPEC §1).  Either naming is accepted in
  the weights (many bare ``.safetensors`` VAEs use LDM names).
  """
  if os.path.isdir(path):
    folder = path
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
        os.path.join(folder, "vae", "config.json")):
      folder = os.path.join(folder, "vae")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
      raise FileNotFoundError(f"{path}: no config.json (expected a diffusers AutoencoderKL folder)")
    with open(cfg_path, encoding="utf-8") as f:
      file_cfg = config_from_diffusers_json(json.load(f))
    if cfg is not None and cfg != file_cfg:
      raise ConversionError(f"{cfg_path}: config {file_cfg} differs from the requested {cfg}")
    cfg = file_cfg
    weights = next((os.path.join(folder, w) for w in _DIFFUSERS_WEIGHTS
                    if os.path.isfile(os.path.join(folder, w))), None)
    if weights is None:
      raise FileNotFoundError(f"{folder}: none of {list(_DIFFUSERS_WEIGHTS)} found")
  else:
    weights = path
    cfg = cfg or AutoencoderKLConfig.sd()
  sd = core.load_torch_file(weights)
  return convert_state_dict(sd, cfg, source=weights), cfg


def load_ldm(path: str, *, cfg: AutoencoderKLConfig | None = None
             ) -> tuple[dict[str, np.ndarray], AutoencoderKLConfig]:
  """An LDM/CompVis checkpoint (``.ckpt`` pickle ``{"state_dict": ...}`` or ``.safetensors``) →
  ``(flat params, config)``; ``cfg`` defaults to the SD config (SPEC §1)."""
  cfg = cfg or AutoencoderKLConfig.sd()
  sd = core.load_torch_file(path)
  return convert_state_dict(sd, cfg, source=path), cfg
