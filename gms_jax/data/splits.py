"""Train / validation / test splits for folders in the GMS layout.

Split files
-----------
* GMS pickle (``<name>_train_test_names.pkl``, as shipped with the original code):
  ``{"train": {"name_list": [...]}, "test": {"name_list": [...]}}``. A pickle can run code when
  it is loaded, so it is read with :class:`RestrictedUnpickler`, which never imports anything: the
  only objects it can build are the ones pickle creates without an import (dict, list, str, int,
  ...), and the result is then checked to be made of dict / list / str / int only.
* JSON: ``{"train": [...], "test": [...]}`` with an optional ``"validation": [...]``; the GMS
  nesting ``{"train": {"name_list": [...]}}`` is accepted too. Names are file stems
  (``benign_12``); a name given with an image extension (``benign_12.png``) is accepted.

Default splits (no split file)
------------------------------
* ``drive``: the official split (``*_training`` -> train, ``*_test`` -> test).
* everything else: a seeded ratio split. Each name (or each *group* of names, see below) gets the
  rank ``sha256(f"gms-split/{seed}/{purpose}/{group}")`` and the lowest-ranked groups are held out
  until ``round(fraction * n)`` names are held out. Hash ranking does not depend on the order in
  which files are listed nor on numpy's RNG stream, so a split is stable across machines and
  library versions, and adding a file does not move any other file between splits.
* Groups keep related images on the same side: ``bus-bra`` groups by patient (``bus_0001-l`` and
  ``bus_0001-r`` are one patient), ``chase_db1`` by child (``Image_01L`` / ``Image_01R``).

Validation
----------
The original GMS code selects its checkpoint on the test split. We never do: a validation split is
always carved out of *train* (the same hash ranking with purpose ``"validation"``, default 10 %),
unless the JSON split file gives one explicitly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

from gms_jax.data.formats import IMAGE_EXTENSIONS
from gms_jax.errors import DataError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")
SPLIT_ALIASES = {"val": "validation", "valid": "validation"}
_MAX_SPLIT_FILE_BYTES = 64 << 20

GroupFn = Callable[[str], str]

# Names that share a group always land in the same split.
_GROUP_PATTERNS: dict[str, str] = {
  "bus-bra": r"^(bus_\d+)-",  # patient id; one patient has up to 2 images (l/r)
  "chase_db1": r"^(Image_\d+)[LR]$",  # child id; left and right eye
}


def group_fn_for(dataset: str) -> GroupFn | None:
  """The grouping used by the ratio split of a shipped dataset (None: every name alone)."""
  pattern = _GROUP_PATTERNS.get(dataset)
  if pattern is None:
    return None
  regex = re.compile(pattern)

  def group(name: str) -> str:
    m = regex.match(name)
    return m.group(1) if m else name

  return group


# --------------------------------------------------------------------------------------------
# Split files
# --------------------------------------------------------------------------------------------


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that refuses every import (so no callable can ever be reached).

  dict, list, str and int are built by pickle opcodes directly and never need ``find_class``;
  anything that does (a class, ``os.system``, ``builtins.eval``, a copyreg extension) is refused.
  """

  def __init__(self, file, *, path: str = "<pickle>"):
    super().__init__(file)
    self._path = path

  def find_class(self, module, name):  # noqa: D401 - pickle API
    raise DataError(
      f"{self._path}: refusing to load this split pickle: it wants to import "
      f"{module}.{name}; a split file may only contain dict/list/str/int "
      "(a pickle that imports can run arbitrary code)"
    )

  def persistent_load(self, pid):
    raise DataError(
      f"{self._path}: refusing to load this split pickle: it uses persistent ids; "
      "a split file may only contain dict/list/str/int"
    )


def _check_plain(obj, path: str, where: str = "top level") -> None:
  """Raise unless obj is built from dict/list/str/int only (exact types)."""
  t = type(obj)
  if t is dict:
    for k, v in obj.items():
      _check_plain(k, path, f"{where} key")
      _check_plain(v, path, f"{where}[{k!r}]")
  elif t is list:
    for i, v in enumerate(obj):
      _check_plain(v, path, f"{where}[{i}]")
  elif t not in (str, int):
    raise DataError(
      f"{path}: split file holds a {t.__name__} at {where}; only dict/list/str/int are allowed"
    )


def load_gms_pickle(path: str | os.PathLike) -> dict[str, list[str]]:
  """Read a GMS ``*_train_test_names.pkl`` safely; returns ``{"train": [...], "test": [...]}``."""
  path = os.fspath(path)
  data = _read_bytes(path)
  try:
    obj = RestrictedUnpickler(io.BytesIO(data), path=path).load()
  except DataError:
    raise
  except Exception as e:  # truncated / not a pickle / bad opcode
    raise DataError(f"{path}: not a readable split pickle ({type(e).__name__}: {e})") from None
  _check_plain(obj, path)
  return _normalise_split_obj(obj, path)


def load_json_split(path: str | os.PathLike) -> dict[str, list[str]]:
  path = os.fspath(path)
  try:
    obj = json.loads(_read_bytes(path).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: not a valid JSON split file ({e})") from None
  return _normalise_split_obj(obj, path)


def load_split_file(path: str | os.PathLike) -> dict[str, list[str]]:
  """Load a GMS pickle or a JSON split file (chosen by extension, else by content)."""
  path = os.fspath(path)
  suffix = Path(path).suffix.lower()
  if suffix in (".pkl", ".pickle"):
    return load_gms_pickle(path)
  if suffix == ".json":
    return load_json_split(path)
  head = _read_bytes(path)[:1]
  return load_gms_pickle(path) if head == b"\x80" else load_json_split(path)


def _read_bytes(path: str) -> bytes:
  if not os.path.isfile(path):
    raise DataError(f"{path}: split file does not exist")
  size = os.path.getsize(path)
  if size > _MAX_SPLIT_FILE_BYTES:
    raise DataError(f"{path}: split file is {size} bytes; refusing anything over 64 MiB")
  with open(path, "rb") as f:
    return f.read()


def _normalise_split_obj(obj, path: str) -> dict[str, list[str]]:
  if not isinstance(obj, dict):
    raise DataError(f"{path}: a split file must hold a dict of splits, got {type(obj).__name__}")
  aliased = [k for k in obj if k in SPLIT_ALIASES]
  if aliased:  # "val" / "valid" name the validation split
    if "validation" in obj or len(aliased) > 1:
      raise DataError(f"{path}: the validation split is given twice ({sorted(aliased)})")
    obj = {SPLIT_ALIASES.get(k, k): v for k, v in obj.items()}
  unknown = set(obj) - set(SPLIT_NAMES)
  if unknown:
    raise DataError(
      f"{path}: unknown split name(s) {sorted(map(str, unknown))}; allowed: {list(SPLIT_NAMES)}"
    )
  for required in ("train", "test"):
    if required not in obj:
      raise DataError(f"{path}: split file has no '{required}' split")
  out: dict[str, list[str]] = {}
  for split, value in obj.items():
    if isinstance(value, dict):
      if set(value) != {"name_list"}:
        raise DataError(
          f"{path}: split '{split}' must be a list of names or {{'name_list': [...]}}, "
          f"got keys {sorted(map(str, value))}"
        )
      value = value["name_list"]
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
      raise DataError(f"{path}: split '{split}' must be a list of file names (strings)")
    if len(set(value)) != len(value):
      dup = sorted({n for n in value if value.count(n) > 1})
      raise DataError(f"{path}: split '{split}' lists names twice: {_preview(dup)}")
    out[split] = list(value)
  return out


# --------------------------------------------------------------------------------------------
# Ratio splits
# --------------------------------------------------------------------------------------------


def _rank(seed: int, purpose: str, group: str) -> bytes:
  return hashlib.sha256(f"gms-split/{seed}/{purpose}/{group}".encode()).digest()


def ratio_split(
  names: Iterable[str],
  fraction: float,
  seed: int,
  *,
  purpose: str,
  group_fn: GroupFn | None = None,
) -> tuple[list[str], list[str]]:
  """Hold out ``round(fraction * n)`` names (at least one when fraction > 0); (kept, held_out).

  Whole groups are held out in hash-rank order until the target is reached (so with groups the
  held-out count can exceed the target by less than one group).
  """
  names = sorted(set(names))
  if not 0.0 <= fraction < 1.0:
    raise DataError(f"{purpose} fraction must be in [0, 1), got {fraction}")
  if fraction == 0.0:
    return names, []
  target = max(1, round(fraction * len(names)))
  groups: dict[str, list[str]] = {}
  for n in names:
    groups.setdefault(group_fn(n) if group_fn else n, []).append(n)
  held: list[str] = []
  for g in sorted(groups, key=lambda g: _rank(seed, purpose, g)):
    if len(held) >= target:
      break
    held.extend(groups[g])
  held_set = set(held)
  return [n for n in names if n not in held_set], sorted(held)


def official_split(dataset: str, names: Sequence[str]) -> tuple[list[str], list[str]] | None:
  """The dataset's published train/test split when one is encoded in its file names."""
  if dataset == "drive":
    train = sorted(n for n in names if n.endswith("_training"))
    test = sorted(n for n in names if n.endswith("_test"))
    if train and test and len(train) + len(test) == len(names):
      return train, test
  return None


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def default_split_file(dataset: str, root: str | os.PathLike) -> str | None:
  """The split file used when none is configured.

  ``ROOT/split.json`` when present, else ``ROOT/<dataset>_train_test_names.pkl`` (busi ships
  ``busi_train_test_names.pkl``), else the single ``ROOT/*_train_test_names.pkl`` if there is
  exactly one (the GMS layout); None means the dataset's default rule (official or ratio split).
  """
  root = Path(root)
  candidates = [root / "split.json", root / f"{dataset}_train_test_names.pkl"]
  for c in candidates:
    if c.is_file():
      return os.fspath(c)
  pickles = sorted(root.glob("*_train_test_names.pkl")) if root.is_dir() else []
  return os.fspath(pickles[0]) if len(pickles) == 1 else None


@dataclasses.dataclass(frozen=True)
class Splits:
  train: tuple[str, ...]
  validation: tuple[str, ...]
  test: tuple[str, ...]
  description: str  # how they were made, for logs and dataset metadata

  def as_dict(self) -> dict[str, tuple[str, ...]]:
    return {"train": self.train, "validation": self.validation, "test": self.test}

  def describe(self) -> str:
    return (
      f"train {len(self.train)} / validation {len(self.validation)} / "
      f"test {len(self.test)} ({self.description})"
    )

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for k, v in self.as_dict().items():
      h.update(k.encode() + b"\0" + "\0".join(v).encode() + b"\1")
    return h.hexdigest()


def _preview(names: Sequence[str], k: int = 5) -> str:
  names = list(names)
  more = f" ... (+{len(names) - k} more)" if len(names) > k else ""
  return ", ".join(repr(n) for n in names[:k]) + more


def _match_names(listed: Sequence[str], available: set[str]) -> tuple[list[str], list[str]]:
  """(stems found in the folder, names not found)."""
  out, missing = [], []
  for name in listed:
    if name in available:
      out.append(name)
      continue
    stem, ext = os.path.splitext(name)
    if ext.lower() in IMAGE_EXTENSIONS and stem in available:
      out.append(stem)
    else:
      missing.append(name)
  return out, missing


def resolve_splits(
  available: Iterable[str],
  *,
  dataset: str = "folder",
  split_file: str | os.PathLike | None = None,
  test_fraction: float = 0.2,
  val_fraction: float = 0.1,
  seed: int = 2333,
) -> Splits:
  """Assign the available stems to train / validation / test; every split non-empty, disjoint."""
  available = set(available)
  if not available:
    raise DataError("no image/mask pairs to split")
  group_fn = group_fn_for(dataset)
  if split_file:
    path = os.fspath(split_file)
    spec = load_split_file(path)
    found = {k: _match_names(v, available) for k, v in spec.items()}
    missing = {k: m for k, (_, m) in found.items() if m}
    if missing:  # every split's missing names, in one error
      raise DataError(
        f"{path}: names that do not exist in the folder (no image/mask pair): "
        + "; ".join(f"split '{k}': {len(m)} ({_preview(m)})" for k, m in missing.items())
      )
    matched = {k: out for k, (out, _) in found.items()}
    unused = sorted(available - set().union(*map(set, matched.values())))
    if unused:
      log.warning(
        "%s: %d image/mask pair(s) in the folder are in no split and are not used: %s",
        path,
        len(unused),
        _preview(unused),
      )
    for split in spec:
      if not matched[split]:
        raise DataError(f"{path}: split '{split}' is empty")
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
      if a in matched and b in matched:
        both = sorted(set(matched[a]) & set(matched[b]))
        if both:
          raise DataError(
            f"{path}: {len(both)} name(s) are in both '{a}' and '{b}': {_preview(both)}"
          )
    train, test = matched["train"], matched["test"]
    desc = f"split file {os.path.basename(path)}"
    if "validation" in matched:
      val = matched["validation"]
      desc += " (validation from file)"
    else:
      train, val = ratio_split(train, val_fraction, seed, purpose="validation", group_fn=group_fn)
      desc += f"; validation = {val_fraction:g} of train (seed {seed})"
  else:
    official = official_split(dataset, sorted(available))
    if official is not None:
      train, test = official
      desc = f"official {dataset} split"
    else:
      train, test = ratio_split(available, test_fraction, seed, purpose="test", group_fn=group_fn)
      desc = f"ratio split: test = {test_fraction:g} (seed {seed})"
    train, val = ratio_split(train, val_fraction, seed, purpose="validation", group_fn=group_fn)
    desc += f"; validation = {val_fraction:g} of train (seed {seed})"
  if group_fn is not None:
    desc += f"; grouped by {_GROUP_PATTERNS[dataset]}"
  splits = Splits(tuple(sorted(train)), tuple(sorted(val)), tuple(sorted(test)), desc)
  for name, members in splits.as_dict().items():
    if not members:
      hint = " (val_fraction must be > 0)" if name == "validation" else ""
      raise DataError(
        f"split '{name}' is empty after splitting {len(available)} pair(s) [{desc}]{hint}"
      )
  return splits
