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

import dataclasses
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
_ATTN_DIFFUSERS = {
  "group_norm": "norm",
  "to_q": "q",
  "to_k": "k",
  "to_v": "v",
  "to_out.0": "proj_out",
  "query": "q",
  "key": "k",
  "value": "v",
  "proj_attn": "proj_out",
}
_RESNET_DIFFUSERS = {
  "norm1": "norm1",
  "conv1": "conv1",
  "norm2": "norm2",
  "conv2": "conv2",
  "conv_shortcut": "nin_shortcut",
}
_RESNET_LDM = {"norm1", "conv1", "norm2", "conv2", "nin_shortcut"}
_ATTN_LDM = {"norm", "q", "k", "v", "proj_out"}


def target_shapes(cfg: AutoencoderKLConfig) -> dict[str, tuple[int, ...]]:
  """Flax path → shape of the model's params (abstract: nothing is allocated)."""
  return dict(_target_shapes(cfg))


@functools.lru_cache(maxsize=8)
def _target_shapes(cfg: AutoencoderKLConfig) -> dict[str, tuple[int, ...]]:
  from flax import nnx

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
  m = re.fullmatch(
    r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)\.(\w+)|downsamplers\.0\.conv)", mod
  )
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
    f"LDM 'encoder.down/decoder.up/mid' keys); first keys: {keys[:5]}"
  )


def make_key_map(naming: str, cfg: AutoencoderKLConfig, *, prefix: str = ""):
  """torch key → Flax path (``None``: ignore; ``KeyError``: unexpected) for one naming."""
  n_levels = len(cfg.block_out_channels)

  def key_map(key: str) -> str | None:
    if prefix:
      if not key.startswith(prefix):
        return None  # another part of a full LDM checkpoint (unet, text encoder, ...)
      key = key[len(prefix) :]
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


def convert_state_dict(
  state_dict: Mapping[str, Any], cfg: AutoencoderKLConfig, *, source: str = "checkpoint"
) -> dict[str, np.ndarray]:
  """Any supported SD VAE state dict (torch tensors or numpy) → flat Flax params for ``cfg``."""
  sd = {}
  for k, v in state_dict.items():
    if hasattr(v, "detach"):  # a torch tensor
      v = v.detach().float().cpu().numpy()
    sd[k] = v
  sd = _squeeze_conv1d(sd)
  prefix = next((p for p in _LDM_PREFIXES if any(k.startswith(p) for k in sd)), "")
  naming = detect_naming(k[len(prefix) :] for k in sd if k.startswith(prefix))
  return core.strict_convert(
    sd,
    make_key_map(naming, cfg, prefix=prefix),
    target_shapes(cfg),
    source=f"{source} ({naming} naming)",
  )


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
  for key, want in (("act_fn", "silu"), ("use_quant_conv", True), ("use_post_quant_conv", True)):
    if key in d and d[key] != want:
      problems.append(f"{key}={d[key]!r} (only {want!r} is supported)")
  if d.get("shift_factor") not in (None, 0, 0.0):
    problems.append(f"shift_factor={d['shift_factor']!r} (only none is supported)")
  for key, want in (
    ("down_block_types", "DownEncoderBlock2D"),
    ("up_block_types", "UpDecoderBlock2D"),
  ):
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
    mid_attention=bool(d.get("mid_block_add_attention", True)),
  )


# ----------------------------------------------------------------------------- architecture inference

# The fields the weights determine; the rest (GroupNorm groups and eps, the latent scale) cannot be
# read from tensor shapes and come from a diffusers config.json, an explicit config or the SD defaults.
INFERRED_FIELDS = (
  "in_channels",
  "out_channels",
  "block_out_channels",
  "layers_per_block",
  "latent_channels",
  "mid_attention",
)
_PATTERNS = {  # naming -> (encoder resnet conv1 (level, block), decoder resnet (level, block), mid attention)
  "ldm": (
    r"encoder\.down\.(\d+)\.block\.(\d+)\.conv1\.weight",
    r"decoder\.up\.(\d+)\.block\.(\d+)\.conv1\.weight",
    "encoder.mid.attn_1.",
    r"(encoder\.down|decoder\.up)\.\d+\.attn\.",
  ),
  "diffusers": (
    r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight",
    r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight",
    "encoder.mid_block.attentions.0.",
    r"(encoder\.down|decoder\.up)_blocks\.\d+\.attentions\.",
  ),
}


def _strip(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
  prefix = next((p for p in _LDM_PREFIXES if any(k.startswith(p) for k in state_dict)), "")
  return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}, prefix


def infer_config(
  state_dict: Mapping[str, Any],
  *,
  source: str = "checkpoint",
  base: AutoencoderKLConfig | None = None,
) -> AutoencoderKLConfig:
  """The architecture an SD-VAE state dict (either naming) holds, from tensor shapes and key counts.

  Fields outside :data:`INFERRED_FIELDS` come from ``base`` (default: the SD config, METHOD §1).
  Raises ConversionError for what this model does not implement (attention inside the levels,
  a decoder whose block count is not ``layers_per_block + 1``) or cannot find.
  """
  sd, _ = _strip(state_dict)
  naming = detect_naming(sd)
  enc_pat, dec_pat, mid_attn, level_attn = _PATTERNS[naming]
  enc, dec = {}, {}
  for k, v in sd.items():
    m = re.fullmatch(enc_pat, k)
    if m:
      enc.setdefault(int(m[1]), {})[int(m[2])] = np.shape(v)
    m = re.fullmatch(dec_pat, k)
    if m:
      dec.setdefault(int(m[1]), set()).add(int(m[2]))
  problems = []
  if not enc or sorted(enc) != list(range(len(enc))):
    raise ConversionError(
      f"{source} ({naming} naming): cannot read the encoder levels (found {sorted(enc)})"
    )
  blocks = {i: len(b) for i, b in enc.items()}
  if len(set(blocks.values())) != 1:
    problems.append(f"encoder levels have different block counts {blocks}")
  layers = blocks[0]
  dec_blocks = sorted({len(b) for b in dec.values()})
  if len(dec) != len(enc) or dec_blocks != [layers + 1]:
    problems.append(
      f"decoder has {len(dec)} levels of {dec_blocks} blocks; expected {len(enc)} "
      f"levels of {layers + 1}"
    )
  if any(re.match(level_attn, k) for k in sd):
    problems.append(
      "attention blocks inside the resolution levels (attn_resolutions) are not supported"
    )
  try:
    conv_in = np.shape(sd["encoder.conv_in.weight"])
    conv_out = np.shape(sd["decoder.conv_out.weight"])
    post_quant = np.shape(sd["post_quant_conv.weight"])
  except KeyError as e:
    raise ConversionError(
      f"{source} ({naming} naming): no {e.args[0]!r}; not an AutoencoderKL"
    ) from e
  if problems:
    raise ConversionError(
      f"{source} ({naming} naming): unsupported VAE architecture: " + "; ".join(problems)
    )
  base = base or AutoencoderKLConfig.sd()
  fields = dict(
    in_channels=int(conv_in[1]),
    out_channels=int(conv_out[0]),
    block_out_channels=tuple(int(enc[i][0][0]) for i in range(len(enc))),
    layers_per_block=int(layers),
    latent_channels=int(post_quant[0]),
    mid_attention=any(k.startswith(mid_attn) for k in sd),
  )
  try:
    return dataclasses.replace(base, **fields)
  except ValueError as e:  # e.g. widths not divisible by the (assumed) GroupNorm group count
    raise ConversionError(
      f"{source}: inferred {fields} does not fit: {e}; GroupNorm groups cannot be "
      "read from the weights: give the VAE's config.json"
    ) from e


def check_against(
  cfg: AutoencoderKLConfig,
  inferred: AutoencoderKLConfig,
  *,
  source: str,
  given: str = "the given config",
) -> None:
  """One ConversionError naming every inferred field where ``cfg`` contradicts the weights."""
  bad = [
    f"{f}={getattr(cfg, f)!r} (weights: {getattr(inferred, f)!r})"
    for f in INFERRED_FIELDS
    if getattr(cfg, f) != getattr(inferred, f)
  ]
  if bad:
    raise ConversionError(f"{source}: {given} contradicts the weights: " + ", ".join(bad))


def resolve_config(
  state_dict: Mapping[str, Any],
  *,
  source: str,
  cfg: AutoencoderKLConfig | None = None,
  file_cfg: AutoencoderKLConfig | None = None,
  file_name: str = "config.json",
  scaling_factor: float | None = None,
) -> AutoencoderKLConfig:
  """The weights' architecture, checked against a diffusers ``config.json`` (``file_cfg``) and an
  explicit ``cfg``; groups/eps/scale from ``cfg``, else ``file_cfg``, else SD; ``scaling_factor``
  overrides the scale."""
  base = cfg or file_cfg or AutoencoderKLConfig.sd()
  inferred = infer_config(state_dict, source=source, base=base)
  if file_cfg is not None:
    check_against(file_cfg, inferred, source=source, given=file_name)
  if cfg is not None:
    check_against(cfg, inferred, source=source)
  if scaling_factor:
    inferred = dataclasses.replace(inferred, scaling_factor=float(scaling_factor))
  return inferred


_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_diffusers(
  path: str, *, cfg: AutoencoderKLConfig | None = None, scaling_factor: float | None = None
) -> tuple[dict[str, np.ndarray], AutoencoderKLConfig]:
  """A diffusers VAE folder (``config.json`` + weights; a pipeline folder with ``vae/`` works too)
  or a bare weights file → ``(flat params, config)``.

  The architecture is read from the weights (:func:`infer_config`) and checked against the folder's
  ``config.json`` and ``cfg`` when given; the latent scale comes from ``scaling_factor``, else
  ``config.json`` (SD-XL: 0.13025), else SD's 0.18215.  Either naming is accepted in the weights
  (many bare ``.safetensors`` VAEs use LDM names).
  """
  file_cfg, cfg_path = None, None
  if os.path.isdir(path):
    folder = path
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
      os.path.join(folder, "vae", "config.json")
    ):
      folder = os.path.join(folder, "vae")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
      raise FileNotFoundError(f"{path}: no config.json (expected a diffusers AutoencoderKL folder)")
    with open(cfg_path, encoding="utf-8") as f:
      try:
        file_cfg = config_from_diffusers_json(json.load(f))
      except ConversionError as e:
        raise ConversionError(f"{cfg_path}: {e}") from None
    weights = next(
      (
        os.path.join(folder, w)
        for w in _DIFFUSERS_WEIGHTS
        if os.path.isfile(os.path.join(folder, w))
      ),
      None,
    )
    if weights is None:
      raise FileNotFoundError(f"{folder}: none of {list(_DIFFUSERS_WEIGHTS)} found")
  else:
    weights = path
  sd = core.load_torch_file(weights)
  cfg = resolve_config(
    sd,
    source=weights,
    cfg=cfg,
    file_cfg=file_cfg,
    file_name=cfg_path or "",
    scaling_factor=scaling_factor,
  )
  return convert_state_dict(sd, cfg, source=weights), cfg


def load_ldm(
  path: str, *, cfg: AutoencoderKLConfig | None = None, scaling_factor: float | None = None
) -> tuple[dict[str, np.ndarray], AutoencoderKLConfig]:
  """An LDM/CompVis checkpoint (``.ckpt`` pickle ``{"state_dict": ...}`` or ``.safetensors``) →
  ``(flat params, config)``.  The architecture is read from the weights and checked against
  ``cfg`` when given; the scale is ``scaling_factor``, else ``cfg``'s, else SD's 0.18215."""
  sd = core.load_torch_file(path)
  cfg = resolve_config(sd, source=path, cfg=cfg, scaling_factor=scaling_factor)
  return convert_state_dict(sd, cfg, source=path), cfg


def load(
  path: str, *, cfg: AutoencoderKLConfig | None = None, scaling_factor: float | None = None
) -> tuple[dict[str, np.ndarray], AutoencoderKLConfig]:
  """The family loader (:data:`gms_jax.tokenizers.REGISTRY`): a diffusers folder or bare
  ``.safetensors`` / ``.bin`` (:func:`load_diffusers`), else an LDM checkpoint (:func:`load_ldm`)."""
  if os.path.isdir(path) or path.endswith((".safetensors", ".bin")):
    return load_diffusers(path, cfg=cfg, scaling_factor=scaling_factor)
  return load_ldm(path, cfg=cfg, scaling_factor=scaling_factor)
