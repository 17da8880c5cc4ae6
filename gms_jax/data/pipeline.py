"""grain input pipeline: random-access source -> augmented, batched, sharded, resumable batches.

Training (:func:`train_dataset`)::

    MapDataset.source(src)                   # records {"image", "mask", "name"} (builder.GmsSource)
      .seed(seed).shuffle()                  # one global permutation per epoch (grain re-seeds
      .repeat()                              #   every epoch: epoch e uses seed + e)
      -> drop the epoch's remainder          # each epoch keeps floor(n / B) * B examples (B =
                                             #   global batch), as torch's drop_last: the dropped
                                             #   ones differ per epoch and epochs stay aligned
      .random_map(augment)                   # rng from (seed, global stream index)
      [process_index::process_count]         # per-process shard: equal counts on every host
      .batch(B // process_count, drop_remainder=True)
      .to_iter_dataset(ReadOptions(...))     # threads + prefetch buffer
      .mp_prefetch(...)                      # optional worker processes (worker_count > 0)

The augmentation runs *before* the shard in the graph, so each example's random parameters
depend on its position in the global stream, not on the host that reads it (two hosts never
reuse one another's augmentation draws). MapDatasets are lazy: a host still only decodes and
augments its own elements. Iterators support ``get_state()`` / ``set_state()``; a restored
iterator continues with exactly the batches the original would have produced.

Evaluation (:func:`eval_examples`) yields unbatched examples in record order (sorted by name),
resized only, with the native mask and size kept so predictions can be mapped back.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from gms_jax.data import augment as aug_lib
from gms_jax.data.checks import DataError, read_image

preprocess_image = aug_lib.preprocess_image


def load_image_file(path: str | os.PathLike) -> np.ndarray:
  """Any image file (png/jpg/bmp/tif, grey/RGB/RGBA/palette/16-bit) -> uint8 (h, w, 3) RGB.

  Raises :class:`DataError` naming the file when it is missing or cannot be decoded.
  """
  return read_image(path)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Batches per epoch with drop_remainder (the epoch's last partial batch is dropped)."""
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
  steps = int(num_examples) // int(global_batch_size)
  if steps == 0:
    raise DataError(
      f"the training split has {num_examples} example(s), fewer than one global batch "
      f"({global_batch_size}); lower the batch size or add data"
    )
  return steps


class _EpochDropRemainder(grain.MapDataset):
  """Infinite stream that keeps the first ``keep`` elements of every ``epoch_len``-long epoch.

  Stream index j -> parent index (j // keep) * epoch_len + j % keep.
  """

  def __init__(self, parent: grain.MapDataset, epoch_len: int, keep: int):
    super().__init__(parent)
    self._epoch_len = int(epoch_len)
    self._keep = int(keep)

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"EpochDropRemainder(keep={self._keep} of {self._epoch_len})"

  def _map_index(self, index: int) -> int:
    epoch, pos = divmod(int(index), self._keep)
    return epoch * self._epoch_len + pos

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._map_index(index)]

  def _getitems(self, indices: Sequence[int]):
    return self._parent._getitems([self._map_index(i) for i in indices])  # noqa: SLF001


class _Augment:
  """``random_map`` transform: record -> {"image": f32 (S,S,3) [0,1], "mask": f32 (S,S) {0,1}}."""

  def __init__(self, image_size: int, augment: bool, num_classes: int = 2):
    self._augmenter = aug_lib.Augmenter(image_size, augment=augment, num_classes=num_classes)

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, mask = self._augmenter(record["image"], record["mask"], rng)
    return {"image": image, "mask": mask}


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags (--grain_*); outside an absl app (argparse CLI,
  pytest, notebooks) nothing parsed them, and grain fails with UnparsedFlagAccessError."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only when not given: grain workers and tests need no jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def train_dataset(
  source,
  *,
  global_batch_size: int,
  image_size: int,
  seed: int,
  augment: bool = True,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int = 0,
  prefetch_buffer: int = 2,
  read_threads: int = 2,
) -> grain.IterDataset:
  """Infinite, per-epoch reshuffled, augmented training batches for this process.

  Yields ``{"image": float32 (b, S, S, 3) in [0, 1], "mask": float32 (b, S, S) in {0, 1}}``
  with ``b = global_batch_size // process_count``. Every epoch has exactly
  ``steps_per_epoch(len(source), global_batch_size)`` batches on every process.
  ``read_threads`` threads per process (or per worker) decode and augment; ``prefetch_buffer``
  batches are kept ready (per worker when ``worker_count > 0``).
  """
  process_index, process_count = _process_layout(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}"
    )
  n = len(source)
  per_epoch = steps_per_epoch(n, global_batch_size) * global_batch_size
  ds = grain.MapDataset.source(source).seed(int(seed) % 2**32)
  ds = ds.shuffle().repeat()
  ds = _EpochDropRemainder(ds, n, per_epoch)
  ds = ds.random_map(_Augment(image_size, augment, getattr(source, "num_classes", 2)))
  ds = ds[process_index::process_count]
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  iter_ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(prefetch_buffer, 1))
  )
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    iter_ds = iter_ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=max(prefetch_buffer, 1)
      )
    )
  return iter_ds


def eval_examples(source, *, image_size: int) -> Iterator[dict[str, Any]]:
  """Each record in order, resized only (docs/METHOD.md §4).

  Yields ``image`` float32 (S,S,3) in [0,1] (bilinear), ``mask`` float32 (S,S) in {0,1} (the
  native mask resized nearest-neighbour, then ``>= 0.5``), ``native_mask`` uint8 (h,w) in
  {0,1}, ``native_size`` (h, w) and ``name``. A source of C > 2 classes gives label maps instead
  (``mask`` float32 class ids, ``native_mask`` uint8 class ids).
  """
  multiclass = getattr(source, "num_classes", 2) > 2
  for i in range(len(source)):
    rec = source[i]
    mask = rec["mask"]
    if mask.ndim == 3:
      mask = mask[..., 0]
    if multiclass:  # label maps (class ids): nearest-neighbour resize keeps the ids
      yield {
        "image": preprocess_image(rec["image"], image_size),
        "mask": aug_lib.resize_mask(mask, image_size).astype(np.float32),
        "native_mask": np.ascontiguousarray(mask, np.uint8),
        "native_size": tuple(int(s) for s in mask.shape[:2]),
        "name": rec["name"],
      }
      continue
    native = (mask > 127).astype(np.uint8)
    grey01 = mask.astype(np.float32) / np.float32(255.0)
    resized = aug_lib.resize_mask(grey01, image_size)
    yield {
      "image": preprocess_image(rec["image"], image_size),
      "mask": (resized >= 0.5).astype(np.float32),
      "native_mask": native,
      "native_size": tuple(int(s) for s in mask.shape[:2]),
      "name": rec["name"],
    }
