"""The latent bank of the ``fast`` recipe: K augmented views of every training pair, encoded once.

The frozen encoder is most of an exact training step's cost and its inputs are only ever the
train-time augmentations (docs/METHOD.md §3) of a fixed training set, so the fast recipe
(:class:`gms_jax.recipes.FastRecipe`; docs/METHOD.md §6.3) encodes ``K`` augmented views of every
training image and mask once and trains the mapper on the stored latents. This module is the
bank's storage and bookkeeping; it does no math: the encoder is a function handed to
:func:`build`.

Views. View ``k`` of training record ``i`` (records in the split's order, sorted by name) is the
METHOD §3 train augmentation (:class:`gms_jax.data.augment.Augmenter`, the exact albumentations
Compose of the exact recipe; plus, when the config asks for them, the image-only intensity and
scanner-look transforms, named in the manifest's ``augmentation``) drawn from
``np.random.default_rng(SeedSequence([seed, i, k]))``
(:func:`view_rng`): a function of ``(seed, i, k)`` only, never of build order, process count or
what was built before, so an interrupted and resumed build, a build on more processes and a
rebuild all store the same views.

Layout (``BANK_DIR`` = ``config.bank.dir``, default ``WORKDIR/bank``)::

    BANK_DIR/manifest.json                   identity (tokenizer, image size, split, seed, ...)
    BANK_DIR/shards/v0003-b0001/             view 3 of records [shard_size, 2*shard_size)
        index.npy      (n,) int64            record indices i
        z_image.npy    (n,h,w,C) float32     image latent: scaled posterior mean (tok.encode .z)
        std_image.npy  (n,h,w,C) float32     unscaled posterior std (only when the tokenizer has a
                                             posterior, i.e. the SD-VAE; TAE std is identically 0)
        z_mask.npy     (n,h,w,C) float32     mask latent (mask as RGB, never noised)
        mask_bits.npy  (n,ceil(S*S/8)) uint8 the augmented binary mask at S x S, np.packbits
        (C > 2 classes: mask_labels.npy (n,S*S) uint8, the augmented label map)
        info.json      {"seconds", "views"}  build time of this shard

The augmented masks are stored as bits at full image resolution (S*S/8 bytes: 6.1 kB per view
at 224², against 100 kB for one TAEF2 latent), so the Dice phase compares decoded predictions
with exactly the mask the exact recipe would use for that view: no downsampling, no deviation.

Atomicity and resumption: a shard is written into ``BANK_DIR/shards/.tmp-<name>`` and renamed
into place (one ``rename``), so a shard directory that exists is complete; a build killed at any
point keeps its finished shards and the next build writes only the missing ones (a leftover
``.tmp-<name>`` of the same shard is the bank's own unfinished write and is replaced). The
manifest is written (atomically) before the first shard; a bank whose manifest disagrees with
the run (another tokenizer, its weights, image size, split, seed, augmentation or shard size)
is refused with one line naming the key. ``num_views`` may grow: views are independent, so a
bank of K views serves any run with K' <= K and a run with K' > K adds views K..K'-1.

Multi-process (pods): shard ``j`` (in view-major order) is built by process ``j % process_count``
into the same ``BANK_DIR`` (a shared filesystem), then every process reads the whole bank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from gms_jax import errors, outputs
from gms_jax.data.checks import DataError

BANK_FORMAT = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
TMP_PREFIX = ".tmp-"
AUGMENTATION = "spec3-albumentations-v1"  # gms_jax/data/augment.py train_transform
LATENT_KEYS = ("z_image", "std_image", "z_mask")
# Manifest keys that must match for a bank to be reused (num_views may grow, see module doc).
IDENTITY_KEYS = (
  "format",
  "tokenizer.name",
  "tokenizer.family",
  "tokenizer.params_sha256",
  "tokenizer.latent_channels",
  "precision",
  "image_size",
  "split.dataset",
  "split.num_records",
  "split.names_sha256",
  "split.data_config",
  "seed",
  "augmentation",
  "shard_size",
  "has_std",
  "latent_shape",
  "num_classes",  # absent (binary) in binary banks
  "mask_coding",
  "mask_latent_shape",
)


class BankMismatchError(errors.ConfigError):
  """The bank in a directory was built for another tokenizer, image size, split or seed."""


# ----------------------------------------------------------------------------- views


def view_rng(seed: int, index: int, view: int) -> np.random.Generator:
  """The generator that draws view ``view`` of record ``index`` (see the module docstring)."""
  return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(view)]))


class _View:
  """``map_with_index`` transform: (i, record) -> view ``k`` of record ``i`` (picklable)."""

  def __init__(
    self,
    image_size: int,
    seed: int,
    view: int,
    augment: bool,
    extras: Sequence[str] = (),
    num_classes: int = 2,
  ):
    from gms_jax.data import augment as aug_lib

    self._augmenter = aug_lib.Augmenter(
      image_size, augment=augment, extras=extras, num_classes=num_classes
    )
    self._seed, self._view = int(seed), int(view)

  def __call__(self, index: int, record: dict[str, Any]) -> dict[str, np.ndarray]:
    image, mask = self._augmenter(
      record["image"], record["mask"], view_rng(self._seed, index, self._view)
    )
    return {"image": image, "mask": mask, "index": np.int64(index)}


def augmented_views(
  source,
  indices: Sequence[int],
  *,
  view: int,
  seed: int,
  image_size: int,
  augment: bool = True,
  batch_size: int = 8,
  read_threads: int = 2,
  extras: Sequence[str] = (),
  num_classes: int = 2,
) -> Iterable[dict[str, np.ndarray]]:
  """Batches of view ``view`` of the records ``indices`` (a contiguous range), via grain.

  ``extras``: optional image-only augmentations (names in ``gms_jax.data.augment.EXTRAS``).

  Yields ``{"image": (b,S,S,3) f32 [0,1], "mask": (b,S,S) f32 {0,1}, "index": (b,) int64}``.
  """
  import grain

  lo, hi = int(indices[0]), int(indices[-1]) + 1
  if list(indices) != list(range(lo, hi)):
    raise ValueError("augmented_views: indices must be a contiguous range")
  ds = grain.MapDataset.source(source).map_with_index(
    _View(image_size, seed, view, augment, extras, num_classes)
  )
  ds = ds[lo:hi].batch(int(batch_size), drop_remainder=False)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2))


def mask_store_key(num_classes: int) -> str:
  """Where a shard keeps its masks: ``mask_bits`` (binary) or ``mask_labels`` (C > 2)."""
  return "mask_labels" if int(num_classes) > 2 else "mask_bits"


def pack_masks(masks01: np.ndarray, num_classes: int = 2) -> np.ndarray:
  """(n,S,S) {0,1} masks -> (n, ceil(S*S/8)) uint8 bits; label maps of C > 2 classes -> (n, S*S)
  uint8 class ids."""
  if int(num_classes) > 2:
    m = np.asarray(masks01)
    return np.rint(m.reshape(m.shape[0], -1)).astype(np.uint8)
  m = np.asarray(masks01) >= 0.5
  return np.packbits(m.reshape(m.shape[0], -1), axis=1)


def unpack_masks(bits: np.ndarray, image_size: int, num_classes: int = 2) -> np.ndarray:
  """Inverse of :func:`pack_masks` -> (n,S,S) float32 in {0,1} (or class ids)."""
  s = int(image_size)
  if int(num_classes) > 2:
    return np.asarray(bits).reshape(-1, s, s).astype(np.float32)
  flat = np.unpackbits(np.asarray(bits), axis=1, count=s * s)
  return flat.reshape(flat.shape[0], s, s).astype(np.float32)


# ----------------------------------------------------------------------------- manifest


def params_sha256(params: Any) -> str:
  """sha256 over a params pytree's leaves (path-sorted names, dtypes, shapes and bytes)."""
  import jax

  h = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{a.dtype.str}:{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def augmentation_name(augment: bool, extras: Sequence[str] = ()) -> str:
  """The manifest's ``augmentation``: what :class:`_View` applies (parsed back by
  :func:`augmentation_extras`), e.g. ``spec3-albumentations-v1+intensity-v1``."""
  from gms_jax.data import augment as aug_lib

  if not augment:
    return "none"
  return AUGMENTATION + "".join(aug_lib.EXTRAS[n].tag for n in aug_lib.check_extras(extras))


def augmentation_extras(name: str) -> tuple[str, ...]:
  """The extras a manifest's ``augmentation`` names (inverse of :func:`augmentation_name`)."""
  from gms_jax.data import augment as aug_lib

  return tuple(n for n, extra in aug_lib.EXTRAS.items() if extra.tag in name)


def names_sha256(names: Sequence[str]) -> str:
  return hashlib.sha256("\0".join(names).encode()).hexdigest()


def make_manifest(
  *,
  tokenizer: dict[str, Any],
  precision: str,
  image_size: int,
  source,
  seed: int,
  num_views: int,
  shard_size: int,
  has_std: bool,
  latent_shape: Sequence[int],
  augment: bool = True,
  extras: Sequence[str] = (),
  num_classes: int = 2,
  mask_coding: str = "channels",
  mask_latent_shape: Sequence[int] | None = None,
) -> dict[str, Any]:
  """The manifest a run expects; ``tokenizer`` = {name, path, family, latent_channels,
  params_sha256}. ``source`` is the training split (a :class:`builder.GmsSource`). A task of
  C > 2 classes adds ``num_classes``, ``mask_coding`` and ``mask_latent_shape`` (its masks are
  stored as label maps, ``mask_labels.npy``); a binary manifest is as before."""
  names = source.names()
  directory = getattr(source, "directory", "")
  extra = {}
  if int(num_classes) > 2:
    extra = {
      "num_classes": int(num_classes),
      "mask_coding": str(mask_coding),
      "mask_latent_shape": [int(s) for s in (mask_latent_shape or latent_shape)],
    }
  return {
    **extra,
    "format": BANK_FORMAT,
    "tokenizer": dict(tokenizer),
    "precision": str(precision),
    "image_size": int(image_size),
    "split": {
      "dataset": str(getattr(source, "dataset", "")),
      "split": "train",
      "num_records": len(names),
      "names_sha256": names_sha256(names),
      # tfds config name: hashes the split files' names and the data files' contents
      "data_config": Path(directory).parent.name if directory else "",
    },
    "seed": int(seed),
    "augmentation": augmentation_name(augment, extras),
    "num_views": int(num_views),
    "shard_size": int(shard_size),
    "has_std": bool(has_std),
    "latent_shape": [int(s) for s in latent_shape],
    "view_seed": "np.random.default_rng(SeedSequence([seed, record_index, view]))",
  }


def _get(d: dict, dotted: str):
  for part in dotted.split("."):
    d = d.get(part) if isinstance(d, dict) else None
  return d


def check_manifest(found: dict[str, Any], expected: dict[str, Any], path: str) -> None:
  """Raises :class:`BankMismatchError` (one line) at the first identity key that differs."""
  for key in IDENTITY_KEYS:
    a, b = _get(found, key), _get(expected, key)
    if a != b:
      short = lambda v: (v[:12] + "…") if isinstance(v, str) and len(v) > 40 else v  # noqa: E731
      raise BankMismatchError(
        f"{path}: this latent bank was built for {key}={short(a)!r} but the run has "
        f"{key}={short(b)!r}; refusing to reuse it (set --config.bank.dir to another folder)"
      )


def _write_json_atomic(path: Path, obj: Any) -> None:
  outputs.write_json_atomic(path, obj, indent=2, sort_keys=True)


def read_manifest(bank_dir: str | os.PathLike) -> dict[str, Any] | None:
  path = Path(bank_dir) / MANIFEST
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: unreadable latent-bank manifest ({e})") from None


def prepare_manifest(
  bank_dir: str | os.PathLike, expected: dict[str, Any], *, write: bool = True
) -> dict[str, Any]:
  """Checks the manifest in ``bank_dir`` against ``expected`` (or writes it when absent).

  Returns the manifest now in force (``num_views`` = the larger of the two). ``write=False``
  (processes other than 0) only checks.
  """
  bank_dir = Path(bank_dir)
  path = bank_dir / MANIFEST
  found = read_manifest(bank_dir)
  if found is None:
    if bank_dir.exists() and any(not p.name.startswith(TMP_PREFIX) for p in bank_dir.iterdir()):
      raise errors.OutputError(
        f"{bank_dir}: exists and holds files but no {MANIFEST}; not a latent bank, refusing to "
        "write into it (set --config.bank.dir to an empty or new folder)"
      )
    if write:
      bank_dir.mkdir(parents=True, exist_ok=True)
      _write_json_atomic(path, expected)
    return dict(expected)
  check_manifest(found, expected, str(path))
  merged = dict(found, num_views=max(int(found["num_views"]), int(expected["num_views"])))
  if write and merged != found:
    _write_json_atomic(path, merged)
  return merged


# ----------------------------------------------------------------------------- shards


@dataclasses.dataclass(frozen=True)
class Shard:
  view: int
  block: int
  start: int
  stop: int

  @property
  def name(self) -> str:
    return f"v{self.view:04d}-b{self.block:04d}"


def shard_plan(num_records: int, num_views: int, shard_size: int) -> list[Shard]:
  """All shards of a bank, view-major: (view 0, block 0), (view 0, block 1), ..."""
  blocks = math.ceil(int(num_records) / int(shard_size))
  return [
    Shard(k, b, b * shard_size, min((b + 1) * shard_size, num_records))
    for k in range(int(num_views))
    for b in range(blocks)
  ]


def shard_dir(bank_dir: str | os.PathLike, shard: Shard) -> Path:
  return Path(bank_dir) / SHARDS / shard.name


def missing_shards(bank_dir, plan: Sequence[Shard]) -> list[Shard]:
  return [s for s in plan if not shard_dir(bank_dir, s).is_dir()]


def write_shard(
  bank_dir: str | os.PathLike, shard: Shard, arrays: dict[str, np.ndarray], info: dict[str, Any]
) -> Path:
  """Writes one shard atomically (temporary directory, then one rename)."""
  final = shard_dir(bank_dir, shard)
  tmp = final.with_name(TMP_PREFIX + final.name)
  if tmp.exists():  # our own unfinished write of this very shard (killed mid-write)
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  for key, value in arrays.items():
    with open(tmp / f"{key}.npy", "wb") as f:
      np.save(f, np.ascontiguousarray(value))
      f.flush()
      os.fsync(f.fileno())
  (tmp / "info.json").write_text(json.dumps(info))
  os.rename(tmp, final)
  return final


EncodeFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def build(
  bank_dir: str | os.PathLike,
  source,
  manifest: dict[str, Any],
  encode_fn: EncodeFn,
  *,
  encode_batch_size: int = 8,
  process_index: int = 0,
  process_count: int = 1,
  read_threads: int = 2,
  log: Callable[[str], None] = print,
) -> dict[str, float]:
  """Builds this process's missing shards of the bank described by ``manifest``.

  ``encode_fn(images (b,S,S,3) f32 [0,1], masks (b,S,S) f32 {0,1})`` returns ``{"z_image",
  "z_mask"}`` (and ``"std_image"`` when ``manifest["has_std"]``), each (b,h,w,C); it is called
  with exactly ``encode_batch_size`` rows (the last batch of a shard is padded by repeating its
  last row; padded rows are dropped). Returns ``{"built", "seconds"}`` of this call.
  """
  plan = shard_plan(manifest["split"]["num_records"], manifest["num_views"], manifest["shard_size"])
  mine = [s for j, s in enumerate(plan) if j % process_count == process_index]
  todo = missing_shards(bank_dir, mine)
  if not todo:
    return {"built": 0, "seconds": 0.0}
  keys = ("z_image", "std_image", "z_mask") if manifest["has_std"] else ("z_image", "z_mask")
  n_classes = int(manifest.get("num_classes", 2))
  mask_key = mask_store_key(n_classes)
  size, seed = int(manifest["image_size"]), int(manifest["seed"])
  augment = manifest["augmentation"] != "none"
  extras = augmentation_extras(manifest["augmentation"])
  t_all = time.time()
  for n_done, shard in enumerate(todo, 1):
    t0 = time.time()
    out: dict[str, list[np.ndarray]] = {k: [] for k in (*keys, "index", mask_key)}
    for batch in augmented_views(
      source,
      range(shard.start, shard.stop),
      view=shard.view,
      seed=seed,
      image_size=size,
      augment=augment,
      batch_size=encode_batch_size,
      read_threads=read_threads,
      extras=extras,
      num_classes=n_classes,
    ):
      n = len(batch["index"])
      images, masks = batch["image"], batch["mask"]
      if n < encode_batch_size:
        pad = encode_batch_size - n
        images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        masks = np.concatenate([masks, np.repeat(masks[-1:], pad, axis=0)])
      enc = encode_fn(images, masks)
      for k in keys:
        out[k].append(np.asarray(enc[k], np.float32)[:n])
      out["index"].append(np.asarray(batch["index"], np.int64))
      out[mask_key].append(pack_masks(batch["mask"], n_classes))
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    seconds = time.time() - t0
    write_shard(bank_dir, shard, arrays, {"seconds": seconds, "views": shard.stop - shard.start})
    log(
      f"latent bank: shard {shard.name} ({shard.stop - shard.start} views) in {seconds:.1f}s "
      f"({seconds / max(shard.stop - shard.start, 1):.3f} s/view); {n_done}/{len(todo)} of this "
      f"process's missing shards"
    )
  return {"built": len(todo), "seconds": time.time() - t_all}


# ----------------------------------------------------------------------------- reading


class Bank:
  """A complete bank, its shards memory-mapped (the OS page cache holds what is used, so a bank
  larger than RAM works); entry ``e = view * N + record``.

  :meth:`gather` reads a batch; :attr:`arrays` concatenates everything (for tests and small
  banks): ``z_image``, ``z_mask`` (K*N,h,w,C) float32, ``std_image`` (when the tokenizer has a
  posterior), ``mask_bits`` (K*N, S*S/8) uint8.
  """

  def __init__(self, bank_dir: str | os.PathLike, num_views: int | None = None):
    self.directory = Path(bank_dir)
    manifest = read_manifest(self.directory)
    if manifest is None:
      raise FileNotFoundError(f"{self.directory / MANIFEST}: no latent bank here")
    self.manifest = manifest
    self.num_records = int(manifest["split"]["num_records"])
    self.num_views = int(manifest["num_views"] if num_views is None else num_views)
    self.image_size = int(manifest["image_size"])
    self.has_std = bool(manifest["has_std"])
    self.num_classes = int(manifest.get("num_classes", 2))
    self._mask_key = mask_store_key(self.num_classes)
    plan = shard_plan(self.num_records, self.num_views, manifest["shard_size"])
    missing = missing_shards(self.directory, plan)
    if missing:
      raise DataError(
        f"{self.directory}: latent bank incomplete, {len(missing)} shard(s) "
        f"missing (first: {missing[0].name}); build it again to resume"
      )
    self._keys = (
      ("z_image", "std_image", "z_mask", self._mask_key)
      if self.has_std
      else ("z_image", "z_mask", self._mask_key)
    )
    self._shard_size = int(manifest["shard_size"])
    self._blocks = math.ceil(self.num_records / self._shard_size)
    self._parts: dict[str, list[np.ndarray]] = {k: [] for k in self._keys}
    self.build_seconds = 0.0
    for shard in plan:  # view-major, blocks in record order: entry = view * N + record
      d = shard_dir(self.directory, shard)
      index = np.load(d / "index.npy")
      if not np.array_equal(index, np.arange(shard.start, shard.stop)):
        raise DataError(f"{d}: records {index[:3]}... do not match the shard's range")
      for k in self._keys:
        self._parts[k].append(np.load(d / f"{k}.npy", mmap_mode="r"))
      self.build_seconds += float(json.loads((d / "info.json").read_text())["seconds"])
    self.nbytes = sum(int(a.nbytes) for parts in self._parts.values() for a in parts)

  @property
  def arrays(self) -> dict[str, np.ndarray]:
    return {k: np.concatenate(v) for k, v in self._parts.items()}

  @property
  def num_entries(self) -> int:
    return self.num_views * self.num_records

  def entry(self, view: np.ndarray, record: np.ndarray) -> np.ndarray:
    return np.asarray(view, np.int64) * self.num_records + np.asarray(record, np.int64)

  def gather(
    self, views: np.ndarray, records: np.ndarray, *, masks: bool = False
  ) -> dict[str, np.ndarray]:
    """The batch of entries (view, record): latents, and the (B,S,S) masks when asked."""
    where = [
      (int(v) * self._blocks + int(r) // self._shard_size, int(r) % self._shard_size)
      for v, r in zip(np.asarray(views), np.asarray(records))
    ]
    mk = self._mask_key
    keys = [k for k in (*LATENT_KEYS, mk) if k in self._parts and (masks or k != mk)]
    out = {k: np.stack([self._parts[k][s][o] for s, o in where]) for k in keys}
    if masks:
      out["mask"] = unpack_masks(out.pop(mk), self.image_size, self.num_classes)
    return out


def disk_bytes(bank_dir: str | os.PathLike) -> int:
  root = Path(bank_dir) / SHARDS
  return sum(f.stat().st_size for f in root.rglob("*.npy")) if root.is_dir() else 0


# ----------------------------------------------------------------------------- data order


def batch_entries(
  step: int, *, num_records: int, num_views: int, batch_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """(views, records) of optimizer step ``step`` (0-based): a pure function of the step.

  Epochs are passes over the N records, as in the exact recipe (``N // B`` batches, the
  remainder dropped, reshuffled every epoch). In epoch ``e`` record ``i`` is seen as view
  ``P_c[i, e % K]`` where ``P_c`` (one random permutation of the K views per record, drawn for
  cycle ``c = e // K``) makes every K consecutive epochs use each view of each record once.
  Nothing depends on iteration history, so a resumed run reads exactly the same batches.
  """
  n, k, b = int(num_records), int(num_views), int(batch_size)
  spe = n // b
  if spe == 0:
    raise DataError(f"the training split has {n} example(s), fewer than one batch ({b})")
  epoch, pos = divmod(int(step), spe)
  order = np.random.default_rng([int(seed), 1, epoch]).permutation(n)
  records = order[pos * b : (pos + 1) * b]
  cycle = epoch // k
  perm = np.argsort(np.random.default_rng([int(seed), 2, cycle]).random((n, k)), axis=1)
  return perm[records, epoch % k].astype(np.int64), records.astype(np.int64)
