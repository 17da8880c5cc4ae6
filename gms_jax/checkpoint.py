"""Checkpoints of a training run (orbax ``CheckpointManager``) and loading a trained mapper.

Layout::

    WORKDIR/config.json                      resolved training config (for people and tools)
    WORKDIR/checkpoints/<step>/state/        train state: {"step", "params", "opt_state", "rng"}
    WORKDIR/checkpoints/<step>/data_iter/    grain iterator state, one JSON per process (absent
                                             for an imported step 0: the iterator starts fresh)
    WORKDIR/checkpoints/<step>/metrics/      {"val_dice", "val_iou"} when validated at that step
    WORKDIR/checkpoints/_ROOT_METADATA       run metadata (first run; gms_jax.run_metadata.RunMetadata)

``params`` is a pure nested dict (``nnx.to_pure_dict``) of the mapper's ``nnx.Param`` values, so
``nnx.merge(graphdef, params)`` rebuilds the model. Both items of a step are written together and
committed atomically (orbax writes a temporary directory and renames it), so a process killed
mid-save leaves the previous checkpoints untouched and the half-written one is ignored.

Retention: the last ``keep`` checkpoints plus the best one by validation Dice
(:data:`BEST_METRIC`, higher is better); checkpoints saved without metrics only count as recent.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

STATE = "state"
DATA_ITER = "data_iter"
BEST_METRIC = "val_dice"
# The workdir's layout lives in gms_jax.layout (importable without jax); re-exported here.
from gms_jax.layout import (  # noqa: F401  (re-exported)
  BANK_SUBDIR,
  CHECKPOINT_SUBDIR,
  CONFIG_FILE,
  METRICS_FILE,
  TENSORBOARD_SUBDIR,
)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def _best_fn(metrics: Any) -> float:
  return float(metrics[BEST_METRIC])


def _type_handlers():
  """orbax's standard handlers, but jax.Arrays are written by one replica.

  orbax's default on CPU/TPU ("replica-parallel") has every replica write a slice, cutting each
  replicated array with an eagerly dispatched slice per device and shape: hundreds of small XLA
  compilations (~15 s per save on 8 CPU devices) for our few MB of replicated state.
  """
  th = ocp.type_handlers
  scalar = th.ScalarHandler()
  return th.create_type_handler_registry(
    (int, scalar),
    (float, scalar),
    (bytes, scalar),
    (np.number, scalar),
    (np.ndarray, th.NumpyHandler()),
    (jax.Array, th.ArrayHandler(use_replica_parallel=False)),
    (str, th.StringHandler()),
  )


class Checkpointer:
  """The run's ``CheckpointManager``: train state + data iterator, last ``keep`` + best.

  All processes must call :meth:`save` and :meth:`restore` (orbax coordinates multi-host I/O).
  """

  def __init__(
    self,
    workdir: str,
    *,
    keep: int = 3,
    metadata: dict | None = None,
    read_only: bool = False,
    async_save: bool = True,
  ):
    preservation = ocm.AnyPreservationPolicy(
      [
        ocm.LatestN(n=max(int(keep), 1)),
        ocm.BestN(
          get_metric_fn=_best_fn, reverse=False, n=1, keep_checkpoints_without_metrics=False
        ),
      ]
    )
    options = ocp.CheckpointManagerOptions(
      best_fn=_best_fn,
      best_mode="max",
      preservation_policy=preservation,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only,
    )
    self.directory = checkpoint_dir(workdir)
    handlers = {
      STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
      DATA_ITER: grain.checkpoint.CheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_handlers=handlers, metadata=metadata
    )

  # ------------------------------------------------------------------ queries
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the highest validation Dice (latest step if none carries metrics)."""
    best = self.manager.best_step()
    return self.manager.latest_step() if best is None else best

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def metadata(self) -> dict:
    """The run metadata saved with the first checkpoint manager of this workdir."""
    return dict(self.manager.metadata().custom_metadata or {})

  # ------------------------------------------------------------------ save / restore
  def save(self, step: int, state: Any, data_iter: Any = None, metrics: dict | None = None) -> bool:
    """Saves ``state`` (and the grain iterator's state) at ``step``; async for arrays.

    The iterator's position is read now (synchronously), so training may continue right away.
    """
    items = {STATE: ocp.args.PyTreeSave(state)}
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    return self.manager.save(
      int(step), args=ocp.args.Composite(**items), metrics=metrics, force=True
    )

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """Restores the train state at ``step`` into ``abstract_state``'s shapes and shardings.

    ``data_iter`` (a grain ``DatasetIterator``), when given, is set to the saved position in place.
    """
    items = {
      STATE: ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
      )
    }
    if data_iter is not None and self.has_data_iter(step):
      # A step written without an iterator (``gms-jax import``: step 0) leaves it at its start.
      items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    return restored[STATE]

  def has_data_iter(self, step: int) -> bool:
    """Whether the checkpoint of ``step`` holds a data iterator position."""
    return os.path.isdir(os.path.join(self.directory, str(int(step)), DATA_ITER))

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the mapper params of ``step`` (partial restore), as ``abstract_params`` describes."""
    item = {"params": abstract_params}
    restored = self.manager.restore(
      int(step),
      args=ocp.args.Composite(
        **{
          STATE: ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
          )
        }
      ),
    )
    return restored[STATE]["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


# ----------------------------------------------------------------------------- for evaluate/predict


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved training config of a workdir (``WORKDIR/config.json``)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not a gms-jax training workdir (no {CONFIG_FILE})")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def resolve_step(ckpt: Checkpointer, which: str | int = "best") -> int:
  """``"best"`` (validation Dice), ``"latest"`` or an explicit step -> a saved step."""
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"{ckpt.directory}: no checkpoints")
  if which == "best":
    return int(ckpt.best_step())
  if which == "latest":
    return int(ckpt.latest_step())
  step = int(which)
  if step not in steps:
    raise FileNotFoundError(
      f"{ckpt.directory}: no checkpoint at step {step}; saved: {sorted(steps)}"
    )
  return step
