"""Key map: GMS ``best_model.pth`` (PyTorch ``ResAttnUNet_DS``) -> :mod:`gms_jax.models.latent_mapper`.

The official checkpoint is ``{"model": state_dict}``.  Each ResBlock's PReLU modules are both
attributes (``resblock.act1``) and members of a Sequential (``resblock.conv1.1``), so every slope
appears under two keys holding the same tensor: the ``conv{1,2}.1.weight`` copy is mapped, the
``act{1,2}.weight`` alias is dropped after checking the two are identical (either alone is fine).
"""

from __future__ import annotations

import functools
import re
from typing import Mapping

import numpy as np

from gms_jax.convert import core
from gms_jax.models import latent_mapper
from gms_jax.models.latent_mapper import MapperConfig

FAMILY = "mapper"  # as written in converted files by gms_jax.convert.convert

_BLOCKS = "conv1_0|conv2_0|conv3_0|conv4_0|conv3_1|conv2_2|conv1_3|conv0_4"
_GN = {"weight": "scale", "bias": "bias"}
_CONV = {"weight": "kernel", "bias": "bias"}
_ALIAS = re.compile(rf"^({_BLOCKS})\.resblock\.act([12])\.weight$")


def key_map(key: str) -> str | None:
  """torch key -> Flax path; ``KeyError`` for a key that has no place in the model."""
  m = re.fullmatch(r"input_blocks\.(weight|bias)", key)
  if m:
    return f"input_blocks/{_CONV[m[1]]}"
  m = re.fullmatch(rf"({_BLOCKS})\.resblock\.conv([12])\.([012])\.(weight|bias)", key)
  if m:
    blk, i, idx, kind = m.groups()
    if idx == "0":
      return f"{blk}/resblock/norm{i}/{_GN[kind]}"
    if idx == "1" and kind == "weight":
      return f"{blk}/resblock/act{i}/weight"
    if idx == "2":
      return f"{blk}/resblock/conv{i}/{_CONV[kind]}"
    raise KeyError(key)
  m = re.fullmatch(rf"({_BLOCKS})\.resblock\.skip_connection\.weight", key)
  if m:
    return f"{m[1]}/resblock/skip_connection/kernel"
  m = re.fullmatch(rf"({_BLOCKS})\.attention\.(norm|q|k|v|proj_out)\.(weight|bias)", key)
  if m:
    blk, sub, kind = m.groups()
    return f"{blk}/attention/{sub}/{(_GN if sub == 'norm' else _CONV)[kind]}"
  m = re.fullmatch(r"(convds[0-3])\.([02])\.(weight|bias)", key)
  if m:
    head, idx, kind = m.groups()
    return f"{head}/norm/{_GN[kind]}" if idx == "0" else f"{head}/conv/{_CONV[kind]}"
  raise KeyError(key)


def _strip_module_prefix(state_dict: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
  """A model saved from ``nn.DataParallel`` has every key prefixed ``module.``."""
  if state_dict and all(k.startswith("module.") for k in state_dict):
    return {k[len("module.") :]: v for k, v in state_dict.items()}
  return state_dict


def _resolve_prelu_aliases(
  state_dict: Mapping[str, np.ndarray], source: str
) -> dict[str, np.ndarray]:
  """Drops ``act{i}.weight`` aliases (after checking them) or renames a lone alias to its canonical key."""
  sd = dict(state_dict)
  differing = []
  for key in sorted(k for k in state_dict if _ALIAS.match(k)):
    blk, i = _ALIAS.match(key).groups()
    canonical = f"{blk}.resblock.conv{i}.1.weight"
    alias = sd.pop(key)
    if canonical not in sd:
      sd[canonical] = alias
    elif np.shape(alias) != np.shape(sd[canonical]) or not np.array_equal(
      np.asarray(alias), np.asarray(sd[canonical])
    ):
      differing.append(f"{key} != {canonical}")
  if differing:
    raise core.ConversionError(
      f"{source}: PReLU aliases hold different values (they must be the same tensor): "
      + ", ".join(differing)
    )
  return sd


@functools.lru_cache(maxsize=8)
def _target_shapes(cfg: MapperConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
  return tuple(latent_mapper.param_shapes(cfg).items())


def target_shapes(cfg: MapperConfig) -> dict[str, tuple[int, ...]]:
  """Flax path -> shape of ``ResAttnUNet_DS(cfg)``, without allocating it (cached per config)."""
  return dict(_target_shapes(cfg))


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray],
  cfg: MapperConfig = MapperConfig(),
  *,
  source: str = "checkpoint",
) -> dict[str, np.ndarray]:
  """GMS mapper state dict -> flat Flax params for ``ResAttnUNet_DS(cfg)`` (strict)."""
  sd = _resolve_prelu_aliases(_strip_module_prefix(state_dict), source)
  return core.strict_convert(sd, key_map, target_shapes(cfg), source=source)


def infer_config(state_dict: Mapping[str, np.ndarray]) -> MapperConfig:
  """Reads in/out channels and width from the tensor shapes (``ch_mult`` and groups are fixed)."""
  state_dict = _strip_module_prefix(state_dict)
  try:
    w_in = state_dict["input_blocks.weight"]
    w_out = state_dict["convds0.2.weight"]
  except KeyError as e:
    raise core.ConversionError(f"not a GMS mapper state dict: no {e.args[0]!r}") from e
  return MapperConfig(
    in_channels=int(w_in.shape[1]), out_channels=int(w_out.shape[0]), ch=int(w_in.shape[0])
  )


def load_gms_mapper(path: str) -> tuple[dict[str, np.ndarray], MapperConfig]:
  """Reads ``best_model.pth`` (or a safetensors of the torch state dict) -> ``(flat params, cfg)``."""
  sd = core.load_torch_file(path)
  cfg = infer_config(sd)
  return convert_state_dict(sd, cfg, source=path), cfg


# ----------------------------------------------------------------------------- Flax -> official


def torch_keys(path: str) -> tuple[str, ...]:
  """Flax path -> the official torch key(s) holding it (inverse of :func:`key_map`).

  A PReLU slope has two: ``{blk}.resblock.conv{i}.1.weight`` and its alias ``{blk}.resblock.act{i}.weight``.
  """
  parts = path.split("/")
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "weight": "weight"}[parts[-1]]
  if parts[0] == "input_blocks":
    return (f"input_blocks.{leaf}",)
  if parts[0].startswith("convds"):
    return (f"{parts[0]}.{'0' if parts[1] == 'norm' else '2'}.{leaf}",)
  blk, group, sub = parts[0], parts[1], parts[2]
  if group == "attention":
    return (f"{blk}.attention.{sub}.{leaf}",)
  if sub == "skip_connection":
    return (f"{blk}.resblock.skip_connection.{leaf}",)
  kind, i = sub[:-1], sub[-1]  # norm1 / act1 / conv1
  if kind == "act":
    return (f"{blk}.resblock.conv{i}.1.weight", f"{blk}.resblock.act{i}.weight")
  return (f"{blk}.resblock.conv{i}.{'0' if kind == 'norm' else '2'}.{leaf}",)


def to_state_dict(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Flat Flax mapper params -> the official ``ResAttnUNet_DS`` state dict (numpy, torch layout).

  Conv kernels go back to OIHW; every key the original's ``state_dict()`` has is present, the PReLU
  slopes under both of their names (the same array object).  Exact: only transposes, no arithmetic.
  """
  out = {}
  for path in sorted(flat):
    arr = np.asarray(flat[path])
    value = np.ascontiguousarray(arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr)
    keys = torch_keys(path)
    if key_map(keys[0]) != path:  # guards the inverse against drift from the forward map
      raise AssertionError(f"{path}: inverse key {keys[0]} maps back to {key_map(keys[0])}")
    for key in keys:
      out[key] = value
  return out
