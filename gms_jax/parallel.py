"""Devices, mesh and shardings: one 1-D ``('data',)`` mesh, data parallel, no global mesh context.

The same code runs on one CPU, on fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), on one GPU and on a multi-host TPU/GPU
slice: parameters and optimizer state are replicated (``P()``), batches are split on their leading
axis over ``'data'`` (``P('data')``), and every array handed to a jitted function is a global
``jax.Array`` built from this process's share with :func:`jax.make_array_from_process_local_data`.

:func:`initialize_distributed` is the only place ``jax.distributed.initialize`` is called, and only
``gms-jax train`` (gms_jax/cli/train.py) calls it (never at import).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(cfg: Mapping[str, Any] | Any) -> None:
  """``jax.distributed.initialize`` from a config (``config.distributed``) when it asks for it.

  Keys: ``initialize`` (bool), ``coordinator_address`` ("" = auto-detect), ``num_processes`` and
  ``process_id`` (-1 = auto-detect), ``timeout_s`` (initialization timeout, seconds).
  """
  get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
  if not get("initialize", False):
    return
  kwargs = {"initialization_timeout": int(get("timeout_s", 300))}
  if get("coordinator_address", ""):
    kwargs["coordinator_address"] = str(get("coordinator_address"))
  if int(get("num_processes", -1)) >= 0:
    kwargs["num_processes"] = int(get("num_processes"))
  if int(get("process_id", -1)) >= 0:
    kwargs["process_id"] = int(get("process_id"))
  logging.info("jax.distributed.initialize(%s)", kwargs)
  jax.distributed.initialize(**kwargs)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes) named ``('data',)``."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``'data'``, other axes replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
  """A pytree of shardings (all replicated) matching ``tree``."""
  return jax.tree.map(lambda _: replicated(mesh), tree)


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> int:
  """Validates that the global batch splits evenly over processes and devices; returns it."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch_size % n_dev or global_batch_size % n_proc:
    raise ValueError(
      f"{what}={global_batch_size} must be divisible by the number of devices ({n_dev}) and "
      f"of processes ({n_proc})"
    )
  return global_batch_size


def local_batch_size(global_batch_size: int) -> int:
  """This process's share of a global batch."""
  return global_batch_size // jax.process_count()


def host_slice(global_batch_size: int) -> slice:
  """The rows of a global batch that this process supplies (process p: the p-th equal share)."""
  b = local_batch_size(global_batch_size)
  i = jax.process_index()
  return slice(i * b, (i + 1) * b)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process numpy arrays (leading axis = this process's share) -> global sharded arrays.

  Each array's global leading dimension is ``local.shape[0] * process_count``.
  """
  sharding = data_sharded(mesh)
  n_proc = jax.process_count()
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(
      sharding, v, (v.shape[0] * n_proc,) + v.shape[1:]
    )
  return out


def replicate_array(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host value (identical on every process) -> a global array replicated over ``mesh``."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, replicated(mesh), lambda idx: x[idx])
