"""Shared machinery of the PyTorch -> Flax converters: reading, strict mapping, saving.

Every converter is a *key map*: a function from a torch key to a Flax path (or ``None`` to ignore
that key, e.g. ``loss.*``).  :func:`strict_convert` applies it to a whole state dict against the
abstract parameter shapes of the target NNX model and raises ONE :class:`ConversionError` that lists
every missing, unexpected and shape-mismatched key, then checks the total parameter count.

Flax parameter files are safetensors with flat ``/``-joined paths (``encoder/conv_in/kernel``) and
the model family and config in the metadata, so the package loads them back without torch.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import numpy as np

from gms_jax.errors import ConversionError  # re-exported; one exception tree

FLAX_FORMAT = "gms_jax.flax_params/v1"


# ----------------------------------------------------------------------------- reading


def torch_module():
  """``torch``, or an ImportError saying how to install it."""
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      "Reading a PyTorch pickle (.ckpt/.pth/.bin) needs torch: pip install 'gms-jax[torch]' "
      "(safetensors files need no torch)."
    ) from e
  return torch


def load_torch_file(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors file or a torch pickle into ``{key: float32 numpy array}``.

  Torch pickles are read with ``torch.load(weights_only=True)``: no arbitrary code runs.  A pickle
  holding ``{"state_dict": ...}`` (LDM) or ``{"model": ...}`` (GMS) is unwrapped.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    try:
      sd = load_file(path)
    except Exception as e:  # safetensors raises several types for a bad header
      raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    return {k: np.asarray(v) for k, v in sd.items()}
  torch = torch_module()
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    # torch's message for a pickle with code in it advises weights_only=False, i.e. running that
    # code: never pass that hint on.
    msg = str(e)
    if "weights_only" in msg or "Unsupported global" in msg:
      why = "it holds objects other than tensors; refused: loading them could run code"
    else:
      why = f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"
    raise ConversionError(f"{path}: not a readable torch checkpoint ({why})") from e
  if isinstance(obj, Mapping):
    for wrapper in ("state_dict", "model"):
      if wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach"):
      out[k] = (
        v.detach().to(torch.float32).cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
      )
  return out


# ----------------------------------------------------------------------------- layout


def to_flax_layout(name: str, arr: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
  """Moves a torch tensor into Flax layout given the target shape.

  conv OIHW -> HWIO; Linear (out,in) -> (in,out); Linear (out,in) into a 1x1 conv kernel
  (1,1,in,out); 1x1 conv OI11 into a Linear (in,out); anything else must already match.
  """
  target_shape = tuple(target_shape)
  arr = np.asarray(arr)
  if arr.ndim == 4 and len(target_shape) == 4:
    out = arr.transpose(2, 3, 1, 0)
  elif arr.ndim == 2 and len(target_shape) == 2:
    out = arr.T
  elif arr.ndim == 2 and len(target_shape) == 4:
    out = arr.T.reshape(1, 1, arr.shape[1], arr.shape[0])
  elif arr.ndim == 4 and len(target_shape) == 2 and arr.shape[2:] == (1, 1):
    out = arr[:, :, 0, 0].T
  else:
    out = arr
  if tuple(out.shape) != target_shape:
    raise ValueError(
      f"{name}: torch shape {tuple(arr.shape)} does not fit Flax shape {target_shape}"
    )
  return np.ascontiguousarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------- strict convert


def flat_shapes(abstract_state) -> dict[str, tuple[int, ...]]:
  """``{'a/b/kernel': shape}`` of an (abstract) ``nnx.State`` of parameters."""
  from flax import nnx

  out = {}
  for path, leaf in nnx.to_flat_state(abstract_state):
    value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
    out["/".join(str(p) for p in path)] = tuple(value.shape)
  return out


def strict_convert(
  state_dict: Mapping[str, np.ndarray],
  key_map: Callable[[str], str | None],
  target_shapes: Mapping[str, tuple[int, ...]],
  *,
  source: str = "checkpoint",
  dedupe: Callable[[str], bool] | None = None,
) -> dict[str, np.ndarray]:
  """Maps every torch key to its Flax path; raises one error listing all problems.

  Args:
    state_dict: torch key -> array.
    key_map: torch key -> Flax path; ``None`` means "known, ignore" (``loss.*``, aliases);
      raising ``KeyError`` means "unknown key" (reported as unexpected).
    target_shapes: Flax path -> shape, from :func:`flat_shapes` of the abstract model.
    source: a name for the error message (usually the file path).
    dedupe: unused hook kept for converters whose checkpoints hold aliased tensors.
  Returns:
    Flax path -> float32 array in Flax layout, exactly covering ``target_shapes``.
  """
  del dedupe
  out: dict[str, np.ndarray] = {}
  unexpected, mismatched, duplicated = [], [], []
  mismatched_paths = set()
  for key in sorted(state_dict):
    try:
      path = key_map(key)
    except KeyError:
      unexpected.append(key)
      continue
    if path is None:
      continue
    if path not in target_shapes:
      unexpected.append(f"{key} (-> {path})")
      continue
    if path in out:
      duplicated.append(f"{key} (-> {path})")
      continue
    try:
      out[path] = to_flax_layout(key, state_dict[key], target_shapes[path])
    except ValueError as e:
      mismatched.append(str(e))
      mismatched_paths.add(path)
  missing = sorted(set(target_shapes) - set(out) - mismatched_paths)  # mis-shaped: reported once
  problems = []
  if missing:
    problems.append(f"missing ({len(missing)}): " + ", ".join(missing))
  if unexpected:
    problems.append(f"unexpected ({len(unexpected)}): " + ", ".join(unexpected))
  if mismatched:
    problems.append(f"shape mismatch ({len(mismatched)}): " + "; ".join(mismatched))
  if duplicated:
    problems.append(f"mapped twice ({len(duplicated)}): " + ", ".join(duplicated))
  if problems:
    raise ConversionError(
      f"{source}: checkpoint does not fit the model:\n  " + "\n  ".join(problems)
    )
  n_expected = sum(int(np.prod(s)) for s in target_shapes.values())
  n_got = sum(int(v.size) for v in out.values())
  if n_expected != n_got:  # cannot happen if shapes match; a guard against a broken key map
    raise ConversionError(f"{source}: parameter count {n_got} != model's {n_expected}")
  return out


# ----------------------------------------------------------------------------- Flax param files


def save_params(path: str, flat: Mapping[str, np.ndarray], *, family: str, config: Mapping) -> None:
  """Writes flat Flax params to safetensors atomically (temp file in the same folder, then rename)."""
  from safetensors.numpy import save_file

  from gms_jax import outputs

  meta = {
    "format": FLAX_FORMAT,
    "family": family,
    "config": json.dumps(dict(config), sort_keys=True),
  }
  arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flat.items()}
  outputs.write_atomic(
    path, lambda tmp: save_file(arrays, tmp, metadata=meta), suffix=".safetensors"
  )


def is_flax_params_file(path: str) -> bool:
  """Whether ``path`` is a safetensors file written by :func:`save_params`."""
  if not (os.path.isfile(path) and path.endswith(".safetensors")):
    return False
  from safetensors import safe_open

  try:
    with safe_open(path, framework="numpy") as f:
      return (f.metadata() or {}).get("format") == FLAX_FORMAT
  except Exception:  # unreadable: let the real loader report it
    return False


def load_params(path: str) -> tuple[dict[str, np.ndarray], str, dict]:
  """Reads a file written by :func:`save_params`: ``(flat params, family, config dict)``."""
  from safetensors import safe_open

  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such parameter file")
  try:
    with safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
      flat = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:
    raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
  if meta.get("format") != FLAX_FORMAT:
    raise ConversionError(
      f"{path}: not a gms_jax Flax parameter file (metadata format={meta.get('format')!r}); "
      "convert it first with `gms-jax convert`"
    )
  return flat, meta["family"], json.loads(meta["config"])


def check_flat(
  flat: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], *, source: str = "params"
) -> None:
  """Raises one ConversionError unless ``flat`` has exactly the paths and shapes of ``shapes``."""
  missing = sorted(set(shapes) - set(flat))
  unexpected = sorted(set(flat) - set(shapes))
  bad = sorted(k for k in set(shapes) & set(flat) if tuple(flat[k].shape) != tuple(shapes[k]))
  if missing or unexpected or bad:
    raise ConversionError(
      f"{source}: parameters do not fit the model: missing {missing}, unexpected {unexpected}, "
      f"shape mismatch {[(k, tuple(flat[k].shape), tuple(shapes[k])) for k in bad]}"
    )


def apply_flat(model, flat: Mapping[str, np.ndarray], *, source: str = "params") -> None:
  """Loads flat ``/``-joined params into an NNX model in place, strictly (same keys, same shapes)."""
  import jax.numpy as jnp
  from flax import nnx

  state = nnx.state(model, nnx.Param)
  check_flat(flat, flat_shapes(state), source=source)
  flat_state = nnx.to_flat_state(state)
  new = []
  for path, leaf in flat_state:
    key = "/".join(str(p) for p in path)
    new.append((path, leaf.replace(jnp.asarray(flat[key]))))
  nnx.update(model, nnx.from_flat_state(new))


def model_to_flat(model) -> dict[str, np.ndarray]:
  """Flat ``/``-joined numpy params of an NNX model (inverse of :func:`apply_flat`)."""
  from flax import nnx

  out = {}
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = leaf.get_value()
    out["/".join(str(p) for p in path)] = np.asarray(value)
  return out
