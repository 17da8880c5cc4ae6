"""Checking a training config before any work, and whether a workdir belongs to it.

:func:`validate` checks types and ranges of every key training reads (no I/O beyond looking at
``tokenizer.path``); :func:`check_resume` compares a new config with the one saved in a workdir and
refuses keys that change the model, the data or the schedule (:data:`HARMLESS_KEYS` may differ;
a key of :data:`ADDED_LATER` missing from the saved config counts as its value there);
:func:`suggest_key` turns an unknown ``--config.x`` into a "did you mean" line. All raise
:class:`gms_jax.errors.ConfigError` with one line naming the key.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from gms_jax.errors import ConfigError

# Keys that may differ between the run that made a workdir and a restart in it: they change
# logging, evaluation cadence, I/O or how the same loss is computed, not the model, data or
# schedule. Every other key must match (a prefix ending in "." covers a whole section).
HARMLESS_KEYS = (
  "log_every_steps",
  "eval_every_steps",
  "eval_batch_size",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "data.worker_count",
  "data.prefetch_buffer",
  "data.tfds_dir",
  "loss.batch_decode",
  "loss.batch_encode",
  "tokenizer.remat_decoder",
  "distributed.",
  "compilation_cache_dir",
  "cpu_library_fusion",
  # the fast recipe: where its bank lives (the manifest checks it is the same bank), how it is
  # encoded, how often it validates
  "bank.dir",
  "bank.encode_batch_size",
  "fast.eval_every_epochs",
)

# Keys added after workdirs were written: a saved config.json without one was made when the key
# did not exist, i.e. with this value (so older runs resume with the new key at that value).
ADDED_LATER = {
  "bank.intensity_augment": False,
  "bank.scanner_augment": False,
  "data.num_classes": 2,  # binary (resolved value)
  "data.class_names": [],
  "mask_coding": "channels",
}

PRECISIONS = ("float32", "bfloat16")
RECIPES = ("exact", "fast")
TOKENIZER_NAMES = ("sd-vae", "sd_vae", "sd", "taef2", "tae", "taesd", "taesdxl", "taef1", "taesd3")
HEADS = ("level3", "level2", "level1", "out")
# config.cpu_library_fusion: XLA CPU's LibraryFusionType values, lower case, without the prefix
CPU_LIBRARY_FUSIONS = ("dot", "reduce", "eltwise", "individual_dot", "individual_convolution")


def cpu_library_fusions(value: Any) -> tuple[str, ...]:
  """``config.cpu_library_fusion`` ("" or a comma list) as names of :data:`CPU_LIBRARY_FUSIONS`;
  ConfigError (one line) naming what is not one."""
  if not isinstance(value, str):
    raise ConfigError(
      f"config.cpu_library_fusion must be '' or a comma list of "
      f"{', '.join(CPU_LIBRARY_FUSIONS)}, got {value!r}"
    )
  names = tuple(n.strip().lower() for n in value.split(",") if n.strip())
  unknown = [n for n in names if n not in CPU_LIBRARY_FUSIONS]
  if unknown:
    raise ConfigError(
      f"config.cpu_library_fusion: unknown {', '.join(map(repr, unknown))}; "
      f"use a comma list of {', '.join(CPU_LIBRARY_FUSIONS)} or ''"
    )
  return names


def to_plain(config: Any) -> dict:
  """A ConfigDict (or dict) as plain JSON values (tuples become lists), as ``config.json`` holds it."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=list))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _harmless(key: str) -> bool:
  return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS_KEYS)


def check_resume(saved: Mapping[str, Any], new: Any, workdir: str) -> None:
  """Raises if ``new`` would continue the run saved in ``workdir`` with a different model, data or
  schedule; the message lists every differing key (old -> new)."""
  old_flat, new_flat = flatten(to_plain(saved)), flatten(to_plain(new))
  diffs = []
  for key in sorted(set(old_flat) | set(new_flat)):
    if _harmless(key):
      continue
    a, b = old_flat.get(key, ADDED_LATER.get(key, "<unset>")), new_flat.get(key, "<unset>")
    if a != b:
      diffs.append(f"{key}: {json.dumps(a)} -> {json.dumps(b)}")
  if diffs:
    raise ConfigError(
      f"{workdir} holds a run with another config ({'; '.join(diffs)}); to start fresh use a "
      "new --workdir (or delete this one), to continue it use its config.json settings"
    )


def suggest_key(key: str, known: Iterable[str]) -> str:
  """One line for an unknown ``--config.<key>``, with the closest known keys."""
  known = sorted(known)
  section, _, leaf = key.rpartition(".")
  # "lr" -> "learning_rate": a leaf that is the initials of a known key's leaf comes first
  close = [
    k
    for k in known
    if k.rpartition(".")[0] == section
    and len(leaf) > 1
    and "".join(p[:1] for p in k.rpartition(".")[2].split("_")) == leaf
  ]
  close += [k for k in difflib.get_close_matches(key, known, n=3, cutoff=0.5) if k not in close]
  close = close[:3]
  if not close:  # same section, or same last part
    leaf = key.rsplit(".", 1)[-1]
    close = [
      k
      for k in known
      if k.rsplit(".", 1)[-1].startswith(leaf[:2]) and k.split(".")[0] == key.split(".")[0]
    ][:3]
  hint = f"; did you mean {' or '.join('config.' + c for c in close)}?" if close else ""
  return f"unknown config key config.{key}{hint}"


# ----------------------------------------------------------------------------- validation


def _get(flat: Mapping[str, Any], key: str) -> Any:
  if key not in flat:
    raise ConfigError(f"config.{key} is missing")
  return flat[key]


def _int(flat, key, lo=None, *, allow=()) -> int:
  v = _get(flat, key)
  if isinstance(v, bool) or not isinstance(v, int):
    if isinstance(v, float) and v.is_integer():
      v = int(v)
    else:
      raise ConfigError(f"config.{key} must be an integer, got {v!r}")
  if v in allow:
    return v
  if lo is not None and v < lo:
    extra = f" (or {', '.join(map(str, allow))})" if allow else ""
    raise ConfigError(f"config.{key} must be >= {lo}{extra}, got {v}")
  return v


def _float(flat, key, lo=None, hi=None, *, lo_open=False) -> float:
  v = _get(flat, key)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ConfigError(f"config.{key} must be a finite number, got {v!r}")
  if lo is not None and (v < lo or (lo_open and v == lo)):
    raise ConfigError(f"config.{key} must be {'>' if lo_open else '>='} {lo}, got {v}")
  if hi is not None and v > hi:
    raise ConfigError(f"config.{key} must be <= {hi}, got {v}")
  return float(v)


def _choice(flat, key, choices) -> str:
  v = _get(flat, key)
  if str(v).lower() not in [c.lower() for c in choices]:
    raise ConfigError(f"config.{key} must be one of {', '.join(map(str, choices))}, got {v!r}")
  return str(v)


def validate(
  config: Any,
  *,
  n_devices: int | None = None,
  n_processes: int = 1,
  check_tokenizer: bool = True,
  check_paths: bool = True,
  check_data: bool = True,
) -> None:
  """Checks every key training reads; raises :class:`ConfigError` naming the first bad key.

  ``check_tokenizer=False`` skips the tokenizer name/path checks (a ready tokenizer is given);
  ``check_paths=False`` skips whether the named files and folders exist (a command line checked
  as text, e.g. the documentation's); ``check_data=False`` skips that a named dataset has a
  ``data.root`` (``gms-jax compile`` reads no data)."""
  from gms_jax.data.builder import DATASET_NAMES

  flat = flatten(to_plain(config))
  _choice(flat, "data.name", DATASET_NAMES)
  size = _int(flat, "data.image_size", 8)
  if size % 8:
    raise ConfigError(
      f"config.data.image_size must be a positive multiple of 8 (the "
      f"tokenizers downsample by 8), got {size}"
    )
  if _float(flat, "data.val_fraction", 0.0, 1.0, lo_open=True) >= 1.0:
    raise ConfigError(
      "config.data.val_fraction must be < 1 (the fraction of train held out for validation; "
      f"the rest trains), got {_get(flat, 'data.val_fraction')}"
    )
  if check_data and _get(flat, "data.name") != "sample" and not str(_get(flat, "data.root") or ""):
    raise ConfigError(
      f"config.data.root is empty: set --config.data.root to the {_get(flat, 'data.name')!r} "
      "folder (images/, masks/)"
    )
  _float(flat, "data.test_fraction", 0.0, 1.0)
  if "data.num_classes" in flat:
    from gms_jax import classes as classes_lib

    n = _int(flat, "data.num_classes", 0)
    if n == 1 or n > classes_lib.MAX_CLASSES:
      raise ConfigError(
        f"config.data.num_classes must be 0 (from the data) or 2..{classes_lib.MAX_CLASSES} "
        f"(background included), got {n}"
      )
    coding = _choice(flat, "mask_coding", classes_lib.CODINGS) if "mask_coding" in flat else ""
    if coding.lower() == "palette" and n > len(classes_lib.PALETTE):
      raise ConfigError(
        f"config.mask_coding=palette has {len(classes_lib.PALETTE)} colours; "
        f"config.data.num_classes={n} needs more (use mask_coding=channels)"
      )
  _int(flat, "data.worker_count", 0)
  _int(flat, "data.prefetch_buffer", 0)
  for key in ("data.root", "data.split_file"):
    path = str(_get(flat, key))
    if path and check_paths and not os.path.exists(path):
      raise ConfigError(f"config.{key}={path}: no such file or folder")

  name = _choice(flat, "tokenizer.name", TOKENIZER_NAMES) if check_tokenizer else "taef2"
  path = str(_get(flat, "tokenizer.path")) if check_tokenizer else ""
  if path and not path.startswith("hf:") and check_paths:
    if not os.path.exists(path):
      raise ConfigError(f"config.tokenizer.path={path}: no such file or folder")
    if not os.access(path, os.R_OK):
      raise ConfigError(f"config.tokenizer.path={path}: not readable")
  elif not path and name.lower() not in ("taef2", "tae", "taesd"):
    raise ConfigError(
      f"config.tokenizer.path is empty: tokenizer {name!r} has no packaged "
      "weights; set --config.tokenizer.path to your SD VAE (diffusers folder or "
      ".safetensors, LDM .ckpt, or a `gms-jax convert` output)"
    )

  _int(flat, "mapper.ch", 1)
  ch_mult = _get(flat, "mapper.ch_mult")
  if (
    not isinstance(ch_mult, list)
    or not ch_mult
    or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ch_mult)
  ):
    raise ConfigError(
      f"config.mapper.ch_mult must be a non-empty list of positive integers, got {ch_mult!r}"
    )
  init = str(flat.get("mapper.init", "") or "")
  if init and check_paths and not os.path.exists(init):
    raise ConfigError(f"config.mapper.init={init}: no such file or folder")
  if "tokenizer.scaling_factor" in flat:
    _float(flat, "tokenizer.scaling_factor", 0.0)

  for key in ("loss.rec_weight", "loss.dice_weight"):
    _float(flat, key, 0.0)
  _float(flat, "loss.noise_prob", 0.0, 1.0)
  heads = _get(flat, "loss.heads")
  if not isinstance(heads, list) or not heads or any(h not in HEADS for h in heads):
    raise ConfigError(
      f"config.loss.heads must be a non-empty list of {', '.join(HEADS)}, got {heads!r}"
    )
  for key in ("loss.batch_decode", "loss.batch_encode"):
    v = flat.get(key, "auto")
    if not isinstance(v, bool) and str(v).strip().lower() not in (
      "auto",
      "true",
      "false",
      "yes",
      "no",
      "on",
      "off",
      "1",
      "0",
    ):
      raise ConfigError(f"config.{key} must be 'auto', true or false, got {v!r}")
  cpu_library_fusions(flat.get("cpu_library_fusion", ""))

  _float(flat, "optimizer.learning_rate", 0.0, lo_open=True)
  _float(flat, "optimizer.b1", 0.0, 1.0)
  _float(flat, "optimizer.b2", 0.0, 1.0)
  _float(flat, "optimizer.eps", 0.0)
  _float(flat, "optimizer.weight_decay", 0.0)
  _float(flat, "schedule.warmup_epochs", 0.0)
  if "optimizer.lr_scaling" in flat:
    _choice(flat, "optimizer.lr_scaling", ("none", "sqrt", "linear"))
    _int(flat, "optimizer.lr_base_batch", 1)

  bs = _int(flat, "batch_size", 1)
  # > 0: the global batch is this x the device count (which then always splits evenly)
  per_device = _int(flat, "per_device_batch_size", 0) if "per_device_batch_size" in flat else 0
  ebs = _int(flat, "eval_batch_size", 1)
  epochs = _int(flat, "num_epochs", 1)
  steps = _int(flat, "num_train_steps", 1, allow=(-1,))  # -1 = num_epochs x steps per epoch
  if steps <= 0 and epochs < 1:
    raise ConfigError("config.num_epochs must be >= 1 when config.num_train_steps is -1")
  for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    _int(flat, key, 1, allow=(-1, 0))
  _int(flat, "keep_checkpoints", 1)
  _int(flat, "seed", 0)
  _int(flat, "data.split_seed", 0)
  _choice(flat, "precision", PRECISIONS)
  if "recipe" in flat:  # (configs saved before the fast recipe have none: exact)
    _choice(flat, "recipe", RECIPES)
    _validate_fast(flat)  # a no-op for the exact recipe
  if n_devices and not per_device:
    for key, v in (("batch_size", bs),):
      if v % n_devices or v % n_processes:
        raise ConfigError(
          f"config.{key}={v} must be divisible by the number of devices "
          f"({n_devices}) and of processes ({n_processes})"
        )
  del ebs  # eval batches are rounded up to the device count


def _validate_fast(flat: Mapping[str, Any]) -> None:
  """The keys of the ``fast`` (latent-bank) recipe (``gms_jax/recipes.py``)."""
  if str(flat["recipe"]).lower() != "fast":
    return
  _int(flat, "bank.num_views", 1)
  _int(flat, "bank.seed", 0)
  _int(flat, "bank.shard_size", 1)
  _int(flat, "bank.encode_batch_size", 1)
  _int(flat, "fast.dice_steps", 0)
  _float(flat, "fast.dice_learning_rate", 0.0)
  _int(flat, "fast.eval_every_epochs", 1)
  decay = _float(flat, "fast.ema_decay", 0.0)
  if decay >= 1.0:
    raise ConfigError(f"config.fast.ema_decay must be in [0, 1), got {decay}")


# ----------------------------------------------------------------------------- --config flags


def packaged_config() -> str:
  """The packaged config file (``gms_jax/configs/gms.py``): what a bare ``--config NAME`` names."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "gms.py")


def config_spec(argv: Sequence[str]) -> str:
  """The value of ``--config`` in ``argv`` ("" if absent)."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def resolve_config_argv(argv: Sequence[str]) -> list[str]:
  """``argv`` with a bare ``--config NAME`` (no ``:``, not a file) turned into the packaged
  ``.../gms_jax/configs/gms.py:NAME``, so an installed package runs from any folder;
  ``--config configs/gms.py:NAME`` (a checkout) and any other file path are left as given."""
  out = list(argv)
  for i, a in enumerate(out):
    value, prefix = None, ""
    if a.startswith("--config="):
      value, prefix = a.split("=", 1)[1], "--config="
    elif a == "--config" and i + 1 < len(out):
      value, i = out[i + 1], i + 1
    if value is None:
      continue
    if value and ":" not in value and not os.path.exists(value) and not value.endswith(".py"):
      out[i] = prefix + f"{packaged_config()}:{value}"
    break
  return out


def flag_error(argv: Sequence[str], exc: BaseException, usage: str) -> ConfigError:
  """The one line for a failed ``--config`` flag parse: a missing config file, the config file's
  own error (an unknown config name), an unknown ``--config.KEY`` (with the closest keys), or the
  bad value's message."""
  import importlib.util

  from gms_jax import errors

  spec = config_spec(argv)
  if spec:
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
      return ConfigError(f"--config {spec}: no such config file {path}")
    try:
      module_spec = importlib.util.spec_from_file_location("_gms_config", path)
      module = importlib.util.module_from_spec(module_spec)
      module_spec.loader.exec_module(module)
      cfg = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # the config file's own error
      return ConfigError(f"--config {spec}: {errors.describe(e)}")
    flat = flatten(to_plain(cfg))
    sections = {k.rsplit(".", 1)[0] for k in flat if "." in k}
    for a in argv:
      if a.startswith("--config."):
        key = a[len("--config.") :].split("=", 1)[0]
        if key not in flat and key not in sections:
          return ConfigError(suggest_key(key, flat))
  return ConfigError(f"bad flag: {errors.one_line(exc)}; {usage}")
