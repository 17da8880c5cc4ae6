"""GMS-layout folders -> tfds ArrayRecord datasets -> random-access sources (no TensorFlow).

``prepare(data_cfg)`` is the entry point::

    sources = prepare(config.data)   # {"train", "validation", "test"} -> GmsSource
    len(sources["train"]); sources["test"][0]   # {"image": uint8 (H,W,3), "mask": uint8 (H,W)
                                                #  in {0,255}, "name": str}

What it does:

1. scans ``root`` (``images/``, ``masks/``) and stops with one :class:`DataError` listing the
   structural problems (unpaired files, duplicate stems, missing folders);
2. resolves the splits (:mod:`gms_jax.data.splits`: GMS pickle / JSON split file, official or
   seeded ratio split, validation carved from train);
3. builds the dataset with :class:`GmsSegmentation` (``file_format="array_record"``) unless it is
   already built. The builder config is named ``<dataset>-<hash>`` where the hash covers the
   file contents, the exact split assignment and the builder version, so different split files,
   fractions, seeds or data never collide in ``tfds_dir``. tfds writes into an
   ``incomplete.*`` directory and renames it when done; any failure (e.g. a corrupt image found
   while encoding) removes it, so a half-built dataset is never left behind. Concurrent
   ``prepare`` calls on one machine are serialised with a file lock;
4. returns ``builder.as_data_source(split)`` wrapped in :class:`GmsSource`.

Records store the image as PNG (single-channel when the image is grey, decoded back to 3
channels), the mask as a single-channel 0/255 PNG, and the stem. Images are stored at their
native size; resizing happens in the pipeline so evaluation can map back to the native size.
TensorFlow is never imported: examples are yielded as encoded PNG bytes and decoded with OpenCV.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gms_jax.data import splits as splits_lib
from gms_jax.data.checks import DataError, read_pair, scan_folder

log = logging.getLogger(__name__)

# Names accepted as data_cfg.name. "folder" = any user folder given by data_cfg.root.
SHIPPED_DATASETS = ("sample", "busi", "bus-bra", "ph2", "drive", "chase_db1")
DATASET_NAMES = SHIPPED_DATASETS + ("folder",)

_DESCRIPTIONS = {
  "sample": "Tiny PH2 sample shipped in the package (gms_jax/assets/sample; smoke runs, tests).",
  "busi": "BUSI benign+malignant (GMS split busi_train_test_names.pkl, 517/130).",
  "bus-bra": "BUS-BRA breast ultrasound (patient-grouped ratio split).",
  "ph2": "PH2 dermoscopy (ratio split).",
  "drive": "DRIVE retinal vessels (official 20/20 split).",
  "chase_db1": "CHASE_DB1 retinal vessels (child-grouped ratio split).",
  "folder": "Any folder in the GMS layout (images/, masks/).",
}

_PNG_COMPRESS_LEVEL = 3


def sample_root() -> Path:
  """The tiny dataset shipped inside the package (``gms_jax/assets/sample``; ``data/sample`` in
  a checkout links to it), so an installed wheel runs the smoke config."""
  return Path(__file__).resolve().parents[1] / "assets" / "sample"


@dataclasses.dataclass(eq=False)
class GmsConfig(tfds.core.BuilderConfig):
  """One dataset (``dataset``) with one fixed split assignment.

  ``pairs`` and ``split_names`` are filled by :func:`prepare`; the static
  ``GmsSegmentation.BUILDER_CONFIGS`` only name the shipped datasets.
  """

  dataset: str = "folder"
  root: str = ""
  split_description: str = ""
  # (stem, image path, mask path), and split -> stems. Not in repr: they can be long.
  pairs: tuple[tuple[str, str, str], ...] = dataclasses.field(default=(), repr=False)
  split_names: tuple[tuple[str, tuple[str, ...]], ...] = dataclasses.field(default=(), repr=False)
  # dataset.json labels by id (empty: a binary folder); masks are then label maps
  class_names: tuple[str, ...] = ()
  read_classes: int | None = None  # 2: a two-label declaration (0/1 or 0/255 masks)


_skip_registration = getattr(
  getattr(tfds.core, "registered", None), "skip_registration", contextlib.nullcontext
)

with _skip_registration():

  class GmsSegmentation(tfds.core.GeneratorBasedBuilder):
    """Binary segmentation pairs from a GMS-layout folder."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "PNG image (RGB or grey) + 0/255 PNG mask + stem."}
    BUILDER_CONFIGS = [
      GmsConfig(name=n, dataset=n, description=_DESCRIPTIONS[n]) for n in DATASET_NAMES
    ]

    # tfds 4.9.10 finds a builder's code with `importlib_resources`, which it only depends
    # on for Python < 3.9 (ModuleNotFoundError here); name the file directly instead.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
      return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
      cfg = self.builder_config
      return tfds.core.DatasetInfo(
        builder=self,
        description=f"{_DESCRIPTIONS.get(cfg.dataset, '')} {cfg.split_description}".strip(),
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "name": tfds.features.Text(),
          }
        ),
        disable_shuffling=True,  # records in name order: eval order is stable
        metadata=tfds.core.MetadataDict(
          dataset=cfg.dataset,
          root=cfg.root,
          splits=cfg.split_description,
          split_names={k: list(v) for k, v in cfg.split_names},
        ),
        homepage="https://github.com/King-HAW/GMS",
      )

    def _split_generators(self, dl_manager):
      cfg = self.builder_config
      if not cfg.pairs:
        raise DataError(
          f"builder config '{cfg.name}' has no files; build datasets with "
          "gms_jax.data.builder.prepare(data_cfg)"
        )
      by_stem = {stem: (img, mask) for stem, img, mask in cfg.pairs}
      return {
        split: self._generate_examples([(s, *by_stem[s]) for s in stems])
        for split, stems in cfg.split_names
      }

    def _generate_examples(self, pairs):
      n_classes = len(self.builder_config.class_names) or self.builder_config.read_classes
      for stem, image_path, mask_path in pairs:
        # DataError naming the file; a label-map folder's masks hold class ids (C = 2: 0/255)
        image, mask, grey = read_pair(image_path, mask_path, n_classes)
        yield (
          stem,
          {
            "image": _record_png(image_path, image[..., 0] if grey else image),
            "mask": _record_png(mask_path, mask),
            "name": stem,
          },
        )


def _decode_like_tfds(data: bytes) -> np.ndarray | None:
  """What tfds' numpy decoder (OpenCV, IMREAD_UNCHANGED, BGR->RGB) makes of PNG bytes."""
  arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if arr is None or arr.dtype != np.uint8:
    return None
  if arr.ndim == 3 and arr.shape[2] == 3:
    arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
  return arr


def _record_png(path: str, arr: np.ndarray) -> bytes:
  """PNG bytes that decode to ``arr`` (2-D grey or RGB): the file itself when it already does
  (no re-encoding for the usual 8-bit L/RGB PNGs), else a fresh lossless encoding."""
  if path.lower().endswith(".png"):
    with open(path, "rb") as f:
      data = f.read()
    decoded = _decode_like_tfds(data)
    if decoded is not None and decoded.shape == arr.shape and np.array_equal(decoded, arr):
      return data
  bgr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr
  ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, _PNG_COMPRESS_LEVEL])
  if not ok:
    raise DataError(f"{path}: could not encode the converted image as PNG")
  return buf.tobytes()


class GmsSource:
  """Random-access split: ``src[i] -> {"image": uint8 (H,W,3), "mask": uint8 (H,W), "name": str}``.

  Wraps tfds' ArrayRecord data source (decoding with OpenCV; no TensorFlow). Picklable, so
  grain worker processes can use it. ``num_classes`` / ``class_names``: the folder's classes
  (:mod:`gms_jax.data.labels`; masks of C > 2 classes are label maps of class ids).
  """

  num_classes = 2
  class_names: tuple[str, ...] = ()

  def __init__(self, data_source, *, split: str, dataset: str, directory: str):
    self._src = data_source
    self.split = split
    self.dataset = dataset
    self.directory = directory

  def __len__(self) -> int:
    return len(self._src)

  @staticmethod
  def _convert(rec: Mapping[str, Any]) -> dict[str, Any]:
    name = rec["name"]
    mask = rec["mask"]
    return {
      "image": rec["image"],
      "mask": mask[..., 0] if mask.ndim == 3 else mask,
      "name": name.decode("utf-8") if isinstance(name, bytes) else str(name),
    }

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self._src)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {self.split} ({n} examples)")
    return self._convert(self._src[index % n])

  def __getitems__(self, indices):
    return [self._convert(r) for r in self._src.__getitems__([int(i) for i in indices])]

  def names(self) -> list[str]:
    return [self[i]["name"] for i in range(len(self))]

  def __repr__(self) -> str:
    return f"GmsSource({self.dataset}/{self.split}, {len(self)} examples, {self.directory})"


# --------------------------------------------------------------------------------------------
# prepare()
# --------------------------------------------------------------------------------------------


def _get(cfg: Any, key: str, default: Any) -> Any:
  if isinstance(cfg, Mapping):
    value = cfg.get(key, default)
  else:
    value = getattr(cfg, key, default) if hasattr(cfg, key) else default
  return default if value is None else value


def resolve_root(name: str, root: str) -> Path:
  if name not in DATASET_NAMES:
    raise DataError(f"unknown dataset name {name!r}; choose one of {list(DATASET_NAMES)}")
  if not root:
    if name == "sample":
      root = os.fspath(sample_root())
    else:
      raise DataError(f"data.root is empty: set it to the {name!r} folder (images/, masks/)")
  path = Path(os.path.expanduser(root)).resolve()
  if not path.is_dir():
    raise DataError(f"{path}: dataset folder for {name!r} does not exist")
  return path


def _content_fingerprint(pairs) -> str:
  h = hashlib.sha256()
  for p in pairs:
    for path in (p.image, p.mask):
      with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").digest()
      h.update(p.stem.encode() + b"\0" + os.path.basename(path).encode() + b"\0" + digest)
  return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def make_config(data_cfg: Any) -> tuple[GmsConfig, str]:
  """Scan + split + name the builder config; returns (config, tfds_dir)."""
  name = str(_get(data_cfg, "name", "sample"))
  root = resolve_root(name, str(_get(data_cfg, "root", "")))
  scan = scan_folder(root)
  if scan.problems:
    shown = "\n  ".join(scan.problems[:20])
    more = f"\n  ... and {len(scan.problems) - 20} more" if len(scan.problems) > 20 else ""
    raise DataError(
      f"{root}: {len(scan.problems)} problem(s) in the dataset folder:\n  {shown}{more}\n"
      f"(run `gms-jax check-data {root}` for a full report)"
    )
  from gms_jax.data import labels as labels_lib

  declared = labels_lib.read_labels(root)
  n_classes, class_names = labels_lib.resolve(data_cfg, root, declared)
  # how masks are read: a two-label declaration reads 0/1 (or 0/255) maps as the binary mask,
  # and leaves the cache name of the binary folder unchanged
  read_classes = 2 if declared is not None and n_classes == 2 else None
  split_file = str(_get(data_cfg, "split_file", "")) or splits_lib.default_split_file(name, root)
  splits = splits_lib.resolve_splits(
    [p.stem for p in scan.pairs],
    dataset=name,
    split_file=split_file,
    test_fraction=float(_get(data_cfg, "test_fraction", 0.2)),
    val_fraction=float(_get(data_cfg, "val_fraction", 0.1)),
    seed=int(_get(data_cfg, "split_seed", 2333)),
  )
  used = set(splits.train) | set(splits.validation) | set(splits.test)
  pairs = [p for p in scan.pairs if p.stem in used]
  h = hashlib.sha256()
  h.update(f"{GmsSegmentation.VERSION}/{name}/".encode())
  h.update(splits.fingerprint().encode())
  h.update(_content_fingerprint(pairs).encode())
  if class_names:  # (binary folders keep the names their caches were built under)
    h.update(("/labels/" + "\0".join(class_names)).encode())
  config = GmsConfig(
    name=f"{name}-{h.hexdigest()[:12]}",
    version=GmsSegmentation.VERSION,
    description=_DESCRIPTIONS[name],
    dataset=name,
    root=os.fspath(root),
    split_description=splits.describe(),
    pairs=tuple((p.stem, p.image, p.mask) for p in pairs),
    split_names=tuple(splits.as_dict().items()),
    class_names=tuple(class_names),
    read_classes=read_classes,
  )
  tfds_dir = os.path.expanduser(str(_get(data_cfg, "tfds_dir", "")) or "~/tensorflow_datasets")
  return config, tfds_dir


class _QuietTfds(logging.Filter):
  """Drop tfds' per-construction notices about our (always custom) configs."""

  _NOISE = ("Using custom data configuration", "has no dataset_info.json")

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not any(n in msg for n in self._NOISE)


logging.getLogger("absl").addFilter(_QuietTfds())


def make_builder(config: GmsConfig, tfds_dir: str) -> GmsSegmentation:
  return GmsSegmentation(config=config, data_dir=tfds_dir, file_format="array_record")


def _build(builder: GmsSegmentation) -> None:
  variant_dir = Path(builder.data_dir)  # .../gms_segmentation/<config>/<version>
  config_dir = variant_dir.parent
  try:
    with tempfile.TemporaryDirectory(prefix="gms_tfds_dl_") as dl_dir:
      builder.download_and_prepare(
        download_dir=dl_dir,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      )
  except BaseException as e:
    # tfds removes its own incomplete.* directory (try/finally); drop the then-empty config
    # directory too. (Other incomplete.* dirs may be another host's build in progress.)
    with contextlib.suppress(OSError):
      config_dir.rmdir()  # only if empty
    if isinstance(e, DataError):
      root = builder.builder_config.root
      raise DataError(
        f"{e}\n(build of {builder.builder_config.name} aborted; nothing was kept. "
        f"`gms-jax check-data {root}` lists every problem in the folder)"
      ) from None
    raise


def verify_cache(builder) -> str | None:
  """Checks every ArrayRecord shard of a prepared dataset against ``dataset_info.json``: the
  file exists and its record count (from the file's footer, cheap) is the recorded shard
  length. Returns a message naming the first bad file, or None."""
  from array_record.python import array_record_module

  for split, info in builder.info.splits.items():
    for path, expected in zip(info.filepaths, info.shard_lengths):
      path = os.fspath(path)
      if not os.path.isfile(path):
        return f"{path}: cached shard of split '{split}' is missing"
      try:
        reader = array_record_module.ArrayRecordReader(path)
        try:
          n = reader.num_records()
        finally:
          reader.close()
      except Exception as e:  # any reader failure = corrupt
        return f"{path}: cached shard of split '{split}' is unreadable ({e})"
      if n != expected:
        return (
          f"{path}: cached shard of split '{split}' holds {n} records, "
          f"dataset_info.json says {expected} (truncated or corrupt)"
        )
  return None


def prepare(data_cfg: Any) -> dict[str, GmsSource]:
  """Build (once, atomically) and open the train / validation / test splits."""
  cfg, tfds_dir = make_config(data_cfg)
  builder = make_builder(cfg, tfds_dir)
  if builder.is_prepared():
    bad = verify_cache(builder)
    if bad:
      lock = Path(tfds_dir) / ".gms_locks" / f"{cfg.name}.lock"
      with _file_lock(lock):
        builder = make_builder(cfg, tfds_dir)
        bad = verify_cache(builder) if builder.is_prepared() else None
        if bad:  # a cache gms-jax built: remove it and build it again below
          log.warning("%s; rebuilding %s", bad, builder.data_dir)
          import shutil

          shutil.rmtree(os.fspath(builder.data_dir))
        builder = make_builder(cfg, tfds_dir)
  if not builder.is_prepared():
    lock = Path(tfds_dir) / ".gms_locks" / f"{cfg.name}.lock"
    with _file_lock(lock):
      builder = make_builder(cfg, tfds_dir)  # another process may have built it meanwhile
      if not builder.is_prepared():
        log.info("building %s (%s) into %s", cfg.name, cfg.split_description, builder.data_dir)
        try:
          _build(builder)
        except OSError:
          # e.g. another host finished the same build first on a shared tfds_dir
          # (the file lock only serialises processes on one machine)
          if not make_builder(cfg, tfds_dir).is_prepared():
            raise
        builder = make_builder(cfg, tfds_dir)
  out = {}
  expected = dict(cfg.split_names)
  for split in splits_lib.SPLIT_NAMES:
    src = GmsSource(
      builder.as_data_source(split),
      split=split,
      dataset=cfg.dataset,
      directory=os.fspath(builder.data_dir),
    )
    src.class_names = tuple(cfg.class_names)
    src.num_classes = len(cfg.class_names) or 2
    if len(src) != len(expected[split]) or len(src) == 0:
      raise DataError(
        f"{builder.data_dir}: split '{split}' has {len(src)} records, expected "
        f"{len(expected[split])}; delete this directory and prepare again"
      )
    out[split] = src
  return out
