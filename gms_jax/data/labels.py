"""The classes of a dataset folder: ``dataset.json`` ``"labels"`` (nnU-Net's convention).

A folder whose ``dataset.json`` declares ``"labels": {"background": 0, "benign": 1, ...}`` (names
to ids; background 0, ids consecutive) holds integer label maps in ``masks/`` (two labels: a
binary task with 0/1 maps); any other folder holds binary 0/255 masks. :func:`read_labels` reads and checks the declaration (one
:class:`DataError` line naming the file), :func:`resolve` fills ``config.data.num_classes`` and
``class_names`` from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gms_jax.data.checks import DataError
from gms_jax.errors import ConfigError

DATASET_JSON = "dataset.json"
MAX_CLASSES = 255  # 8-bit label maps
RESERVED_NAMES = ("fg", "native")  # dsc_fg, *_native are metric columns of their own


def read_labels(root: str | os.PathLike) -> tuple[str, ...] | None:
  """Class names by id from ``ROOT/dataset.json`` (``None``: no file, or no ``"labels"`` in it:
  a binary folder); :class:`DataError` naming the file for anything malformed."""
  path = Path(root) / DATASET_JSON
  if not path.is_file():
    return None
  try:
    meta = json.loads(path.read_text(encoding="utf-8"))
  except UnicodeDecodeError:
    raise DataError(f"{path}: not UTF-8 text; expected a JSON object with \"labels\"") from None
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e.strerror})") from None
  if not isinstance(meta, dict):
    raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
  labels = meta.get("labels")
  if labels is None:
    return None
  if not isinstance(labels, dict) or not labels:
    raise DataError(
      f"{path}: \"labels\" must be an object of class name -> integer id, e.g. "
      '{"background": 0, "lesion": 1}'
    )
  if all(str(k).strip().isdigit() for k in labels) and all(
    isinstance(v, str) for v in labels.values()
  ):
    raise DataError(
      f"{path}: \"labels\" maps ids to names (nnU-Net v1's form); write name -> id, e.g. "
      '{"background": 0, "lesion": 1}'
    )
  bad = {k: v for k, v in labels.items() if isinstance(v, bool) or not isinstance(v, int)}
  if bad:
    name, value = next(iter(bad.items()))
    raise DataError(
      f"{path}: label {name!r} has id {json.dumps(value)}; ids must be integers (region "
      "lists of nnU-Net are not supported)"
    )
  ids = sorted(labels.values())
  if len(set(ids)) != len(ids):
    dup = sorted({i for i in ids if ids.count(i) > 1})
    raise DataError(f"{path}: label ids {dup} are given to more than one class")
  if ids[0] != 0:
    raise DataError(f"{path}: no class has id 0; the background must be 0")
  if ids != list(range(len(ids))):
    missing = sorted(set(range(ids[-1] + 1)) - set(ids))
    raise DataError(f"{path}: label ids must be consecutive from 0; missing {missing}")
  if len(ids) < 2:
    raise DataError(f"{path}: only the background is declared; a task needs >= 2 classes")
  if len(ids) > MAX_CLASSES:
    raise DataError(f"{path}: {len(ids)} classes; 8-bit label maps hold at most {MAX_CLASSES}")
  reserved = [k for k in labels if not str(k).strip() or str(k) in RESERVED_NAMES]
  if reserved:
    raise DataError(
      f"{path}: class name {reserved[0]!r} is empty or reserved ({', '.join(RESERVED_NAMES)} name "
      "metric columns); rename it"
    )
  by_id = {v: str(k) for k, v in labels.items()}
  return tuple(by_id[i] for i in range(len(ids)))


def is_multiclass(names: tuple[str, ...] | None) -> bool:
  """A declaration of more than two classes (two classes are a binary task: 0/255 masks)."""
  return names is not None and len(names) > 2


def resolve(
  data_cfg: Any, root: str | os.PathLike, names: tuple[str, ...] | None = None
) -> tuple[int, tuple[str, ...]]:
  """``(num_classes, class_names)`` of the data ``data_cfg`` names (its folder ``root``), checked
  against ``data_cfg.num_classes`` (0 = from the data): ConfigError naming the key on mismatch.
  Binary folders give ``(2, ())``. ``names``: :func:`read_labels` of ``root`` when the caller
  has read it already."""
  names = read_labels(root) if names is None else names
  n = len(names) if names is not None else 2
  want = int(data_cfg.get("num_classes", 0) or 0)
  if want and want != n:
    found = (
      f"{Path(root) / DATASET_JSON} declares {n} classes"
      if names is not None
      else f"{root} is a binary folder (no dataset.json labels)"
    )
    raise ConfigError(f"config.data.num_classes={want} but {found}")
  return n, (names if n > 2 else ())  # two labels: a binary task, as a folder without labels


def apply(config: Any, root: str | os.PathLike) -> None:
  """Writes :func:`resolve` into ``config.data`` (what the workdir's config.json records)."""
  n, names = resolve(config.data, root)
  with config.unlocked():
    config.data.num_classes = n
    config.data.class_names = tuple(names)
