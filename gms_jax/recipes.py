"""The two training recipes, as what the one loop (:mod:`gms_jax.train`) asks of a recipe.

A recipe supplies only its batches, which step of the builder (:func:`gms_jax.step.build`) runs
at each optimizer step, its validation and its cadence; everything else (state, programs, mesh,
checkpoints, metrics, NaN stop, timing, progress) is shared.

* :class:`ExactRecipe` (``recipe = "exact"``, the original method): a grain pipeline of freshly
  augmented image/mask batches; the ``"exact"`` step runs the frozen encoder, the mapper and the
  decoder's Dice at every step; its iterator state is checkpointed.
* :class:`FastRecipe` (``recipe = "fast"``): K augmented views of every training pair are encoded
  once by the frozen encoder into a latent bank (:mod:`gms_jax.bank`; atomic shards, resumable,
  reused across restarts, refused when built for another tokenizer, image size, split or seed);
  phase 1 (``"phase1"``: the latent term only, no decoder in the program) runs for ``num_epochs``
  epochs (or ``num_train_steps``), phase 2 (``"phase2"``: + the decoder Dice against the view's
  stored mask) for ``fast.dice_steps`` more steps. The data order is a pure function of the step
  (:func:`gms_jax.bank.batch_entries`), so a resumed run reads the same batches with no iterator
  state. Validation images are encoded once (the tokenizer is frozen and validation is
  noise-free); each validation runs only the mapper and the decoder.

Both validate on the validation split (docs/METHOD.md, "Evaluation"): mean Dice / IoU of the
thresholded ``"out"`` head, gathered over all processes.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from gms_jax import bank as bank_lib
from gms_jax import classes as classes_lib
from gms_jax import inference, layout, parallel, tokenizers
from gms_jax import metrics as metrics_lib
from gms_jax import step as step_lib


def every(value: int, default: int) -> int:
  """A cadence key: ``value`` when > 0, else ``default``."""
  return default if value is None or int(value) <= 0 else int(value)


class _Validator:
  """Validation on the validation split: ``probs(params, chunk)`` for each padded batch of
  ``inputs`` (:func:`gms_jax.inference.in_fixed_batches`), thresholded, mean Dice / IoU."""

  def __init__(
    self,
    built: step_lib.Step,
    inputs: np.ndarray,
    masks: np.ndarray,
    program: Callable,
    tok_params: Any,
    eval_bs: int,
  ):
    self._built, self._inputs, self._masks = built, inputs, masks
    self._program, self._tok_params, self._bs = program, tok_params, eval_bs
    self._rows = parallel.host_slice(eval_bs)

  def __call__(self, params) -> dict[str, float]:
    probs = run_sharded(
      self._built, lambda x: self._program(params, self._tok_params, x), self._inputs, self._bs
    )
    classes = self._built.classes
    if classes.binary:
      dsc, iou = metrics_lib.dice_iou(probs > inference.THRESHOLD, self._masks)
      return {"val_dice": float(np.mean(dsc)), "val_iou": float(np.mean(iou))}
    # C > 2: per image the mean over the foreground classes present (in truth or prediction)
    # (an image with no class in truth or prediction counts 0, as METHOD §4's binary rule; a
    # class absent from the whole validation split logs no per-class value)
    d, i = metrics_lib.class_dice_iou(classes.labels(probs), self._masks, classes.num_classes)
    out = {
      "val_dice": float(np.mean(np.nan_to_num(metrics_lib.nanmean(d, axis=-1)))),
      "val_iou": float(np.mean(np.nan_to_num(metrics_lib.nanmean(i, axis=-1)))),
    }
    for c, name in enumerate(classes.class_names()[1:]):
      v = float(metrics_lib.nanmean(d[:, c]))
      if not np.isnan(v):
        out[f"val_dice_{name}"] = v
    return out


def run_sharded(
  built: step_lib.Step, program: Callable, inputs: np.ndarray, eval_bs: int
) -> np.ndarray:
  """``program`` (a batch-sharded jitted function of one global batch) over all ``inputs`` in
  padded batches of ``eval_bs``; each process feeds its rows and gets every process's outputs."""
  rows = parallel.host_slice(eval_bs)

  def run(chunk):
    x = jax.make_array_from_process_local_data(built.data_sharding, chunk[rows], chunk.shape)
    return multihost_utils.process_allgather(program(x), tiled=True)

  return inference.in_fixed_batches(run, inputs, eval_bs)


def _validation_arrays(source, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  from gms_jax.data import pipeline

  val = list(pipeline.eval_examples(source, image_size=image_size))
  images = np.stack([e["image"] for e in val]).astype(np.float32)
  masks = np.stack([e["mask"] for e in val])
  if getattr(source, "num_classes", 2) > 2:
    return images, np.rint(masks).astype(np.uint8)  # label maps
  return images, masks >= 0.5


class ExactRecipe:
  """The original recipe (module docstring)."""

  name = "exact"

  def __init__(self, config: ml_collections.ConfigDict, built: step_lib.Step, sources: dict, **_):
    from gms_jax.data import pipeline

    self._built = built
    self.eval_every = every(config.eval_every_steps, built.steps_per_epoch)
    self.data_iter = iter(
      pipeline.train_dataset(
        sources["train"],
        global_batch_size=built.global_batch_size,
        image_size=built.image_size,
        seed=int(config.seed),
        augment=bool(config.data.augment),
        worker_count=int(config.data.worker_count),
        prefetch_buffer=int(config.data.prefetch_buffer),
      )
    )
    self.info: dict[str, Any] = {}

  def batch(self, step: int) -> dict[str, jax.Array]:
    del step  # the grain iterator's position is checkpointed with the state
    return parallel.global_batch(next(self.data_iter), self._built.mesh)

  def scalars(self, step: int) -> dict[str, float]:
    del step
    return {}

  def validator(self, tok_params: Any, source, eval_bs: int) -> Callable:
    images, masks = _validation_arrays(source, self._built.image_size)
    return _Validator(self._built, images, masks, self._built.predict, tok_params, eval_bs)


class FastRecipe:
  """The latent-bank recipe (module docstring). Building the bank happens here, before any
  program is compiled; ``progress["started"]`` is set once the bank starts being written, so a
  run interrupted during the (long) build keeps its finished shards for the next start."""

  name = "fast"
  data_iter = None  # the data order is a function of the step

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    built: step_lib.Step,
    sources: dict,
    *,
    workdir: str,
    tokenizer: tokenizers.Tokenizer,
    progress: dict[str, bool],
  ):
    self._built, self._seed = built, int(config.seed)
    self.eval_every = every(
      config.eval_every_steps, max(int(config.fast.eval_every_epochs), 1) * built.steps_per_epoch
    )
    local = [d for d in built.mesh.devices.flat if d.process_index == jax.process_index()]
    self.bank, self.info = prepare_bank(
      config,
      workdir,
      sources["train"],
      tokenizer,
      local,
      progress=progress,
      compiler_options=built.compiler_options,
    )
    self._rows = parallel.host_slice(built.global_batch_size)

  def batch(self, step: int) -> dict[str, jax.Array]:
    b = self.bank
    views, records = bank_lib.batch_entries(
      step,
      num_records=b.num_records,
      num_views=b.num_views,
      batch_size=self._built.global_batch_size,
      seed=self._seed,
    )
    local = b.gather(
      views[self._rows], records[self._rows], masks=self._built.step_name(step) == "phase2"
    )
    return parallel.global_batch(local, self._built.mesh)

  def scalars(self, step: int) -> dict[str, float]:
    return {"dice_phase": float(self._built.step_name(step - 1) == "phase2")}

  def validator(self, tok_params: Any, source, eval_bs: int) -> Callable:
    built = self._built
    images, masks = _validation_arrays(source, built.image_size)
    z = run_sharded(built, lambda x: built.encode_images(tok_params, x), images, eval_bs)
    return _Validator(built, z, masks, built.predict_latents, tok_params, eval_bs)


RECIPES = {"exact": ExactRecipe, "fast": FastRecipe}


# ----------------------------------------------------------------------------- the latent bank


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def tokenizer_identity(config: ml_collections.ConfigDict, tok: tokenizers.Tokenizer) -> dict:
  return {
    "name": str(config.tokenizer.name),
    "path": str(config.tokenizer.path),
    "family": tok.family,
    "latent_channels": int(tok.latent_channels),
    "params_sha256": bank_lib.params_sha256(tok.params),
  }


def make_encode_fn(
  tok: tokenizers.Tokenizer,
  devices: list[jax.Device],
  compiler_options: dict[str, str] | None = None,
  classes: Any = None,
) -> Callable:
  """A jitted :func:`gms_jax.step.bank_encode_fn` as ``(images, masks) -> numpy dict`` over
  ``devices`` (this process's devices: each process encodes its own shards);
  ``compiler_options``: XLA's (:func:`gms_jax.step.compiler_options`)."""
  mesh = parallel.make_mesh(devices)
  shard = parallel.data_sharded(mesh)
  tok_params = jax.tree.map(
    lambda x: jax.device_put(np.asarray(x), parallel.replicated(mesh)), tok.params
  )
  encode = jax.jit(step_lib.bank_encode_fn(tok, classes), compiler_options=compiler_options)

  def encode_fn(images, masks):
    out = encode(
      tok_params,
      jax.device_put(np.asarray(images, np.float32), shard),
      jax.device_put(np.asarray(masks, np.float32), shard),
    )
    return {k: np.asarray(v) for k, v in out.items()}

  return encode_fn


def bank_extras(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The optional view extras a config turns on: ``bank.<name>_augment`` for each name in
  ``gms_jax.data.augment.EXTRAS`` (absent keys, from configs older than the option, are off)."""
  from gms_jax.data import augment as aug_lib

  return tuple(n for n in aug_lib.EXTRAS if bool(config.bank.get(f"{n}_augment", False)))


def prepare_bank(
  config: ml_collections.ConfigDict,
  workdir: str,
  train_source,
  tok: tokenizers.Tokenizer,
  local_devices: list[jax.Device],
  *,
  progress: dict[str, bool] | None = None,
  compiler_options: dict[str, str] | None = None,
) -> tuple[bank_lib.Bank, dict[str, Any]]:
  """Checks or writes the manifest, builds the missing shards (this process's), opens the bank
  (the encoder compiled with ``compiler_options``: the run's :func:`gms_jax.step.compiler_options`).

  A bank built for another tokenizer, image size, split or seed raises
  :class:`gms_jax.bank.BankMismatchError` (one line) before anything is written."""
  size = int(config.data.image_size)
  f = tok.downsample
  if size % f:
    raise ValueError(f"config.data.image_size={size} is not a multiple of {f}")
  bank_dir = os.path.abspath(str(config.bank.dir) or os.path.join(workdir, layout.BANK_SUBDIR))
  k = int(config.bank.num_views)
  if k < 1:
    raise ValueError(f"config.bank.num_views must be >= 1, got {k}")
  n_local = len(local_devices)
  ebs = -(-int(config.bank.encode_batch_size) // n_local) * n_local
  classes = classes_lib.from_config(config)
  expected = bank_lib.make_manifest(
    tokenizer=tokenizer_identity(config, tok),
    precision=str(config.precision),
    image_size=size,
    source=train_source,
    seed=int(config.bank.seed),
    num_views=k,
    shard_size=int(config.bank.shard_size),
    has_std=tok.has_posterior,
    latent_shape=(size // f, size // f, tok.latent_channels),
    augment=bool(config.data.augment),
    extras=bank_extras(config),
    num_classes=classes.num_classes,
    mask_coding=classes.effective_coding,
    mask_latent_shape=(size // f, size // f, classes.mask_latent_channels(tok.latent_channels)),
  )
  if jax.process_index() == 0:
    manifest = bank_lib.prepare_manifest(bank_dir, expected, write=True)
  _sync("gms_bank_manifest")
  if jax.process_index() != 0:
    manifest = bank_lib.prepare_manifest(bank_dir, expected, write=False)
  manifest = dict(manifest, num_views=k)  # build (and read) the views this run uses
  if progress is not None:
    progress["started"] = True  # from here on the workdir holds work worth keeping
  t0 = time.time()
  stats = bank_lib.build(
    bank_dir,
    train_source,
    manifest,
    make_encode_fn(tok, local_devices, compiler_options, classes),
    encode_batch_size=ebs,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    log=lambda s: logging.info("%s", s),
  )
  _sync("gms_bank_built")
  bank = bank_lib.Bank(bank_dir, num_views=k)
  info = {
    "dir": bank_dir,
    "views": k,
    "records": bank.num_records,
    "entries": bank.num_entries,
    "bytes": bank_lib.disk_bytes(bank_dir),
    "build_seconds_total": bank.build_seconds,
    "built_now": stats["built"],
    "seconds_now": time.time() - t0,
    "seconds_per_view": bank.build_seconds / max(bank.num_entries, 1),
  }
  logging.info(
    "latent bank %s: %d views x %d records, %.1f MiB on disk, built in %.1fs in all "
    "(%.3f s/view); this run built %d shard(s) in %.1fs",
    bank_dir,
    k,
    bank.num_records,
    info["bytes"] / 2**20,
    bank.build_seconds,
    info["seconds_per_view"],
    stats["built"],
    info["seconds_now"],
  )
  return bank, info
