"""The metadata of a training workdir, in one typed place, and loading a workdir's mapper.

Written once with a workdir's first checkpoint manager (orbax ``_ROOT_METADATA``) by
``gms-jax train`` and ``gms-jax import``, read by ``evaluate``, ``predict``, ``export`` and
``Segmenter.from_workdir``::

    {"config": {...resolved training config...},
     "mapper": {...MapperConfig...},
     "tokenizer": {"name", "path", "family", "latent_channels"},
     "init": null | {"source", "sha256", "format", "how"}}   # weights the run started from

``init`` records where the step-0 weights came from when they were not a random init:
``how="import"`` (``gms-jax import``) or ``how="mapper.init"`` (training from ``--config.mapper.init``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import ml_collections

from gms_jax import checkpoint as ckpt_lib
from gms_jax.models.latent_mapper import MapperConfig


@dataclasses.dataclass(frozen=True)
class RunMetadata:
  """Typed view of a workdir's checkpoint metadata (see the module docstring)."""

  config: dict[str, Any]
  mapper: MapperConfig
  tokenizer: dict[str, Any]
  init: dict[str, Any] | None = None

  @classmethod
  def for_run(
    cls,
    config: ml_collections.ConfigDict,
    mapper: MapperConfig,
    tokenizer: Any,
    *,
    init: Mapping[str, Any] | None = None,
  ) -> "RunMetadata":
    """From a training config, the mapper config and the loaded :class:`~gms_jax.tokenizers.Tokenizer`."""
    return cls(
      config=json.loads(config.to_json_best_effort()),
      mapper=mapper,
      tokenizer={
        "name": str(config.tokenizer.name),
        "path": str(config.tokenizer.path),
        "family": tokenizer.family,
        "latent_channels": int(tokenizer.latent_channels),
      },
      init=None if init is None else dict(init),
    )

  def to_dict(self) -> dict[str, Any]:
    return {
      "config": self.config,
      "mapper": self.mapper.to_dict(),
      "tokenizer": dict(self.tokenizer),
      "init": self.init,
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, source: str = "workdir") -> "RunMetadata":
    missing = [k for k in ("config", "mapper") if k not in d]
    if missing:
      raise FileNotFoundError(f"{source}: checkpoint metadata has no {', '.join(missing)}")
    return cls(
      config=dict(d["config"]),
      mapper=MapperConfig.from_dict(d["mapper"]),
      tokenizer=dict(d.get("tokenizer") or {}),
      init=d.get("init"),
    )

  @property
  def run_config(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(self.config)

  @classmethod
  def read(cls, ckpt: "ckpt_lib.Checkpointer") -> "RunMetadata":
    return cls.from_dict(ckpt.metadata(), source=ckpt.directory)


def cpu_info(path: str = "/proc/cpuinfo") -> dict[str, Any]:
  """This host's CPU: ``{"model", "cores", "mhz", "simd"}`` (``simd``: "avx512", "avx2" or
  "other", from /proc/cpuinfo flags; empty fields where it cannot be read).

  Wall-clock numbers on CPU depend on it: XLA's CPU code uses the widest vectors the host has,
  and the same fast run is ~2x slower on an AVX2-only host than on an AVX-512 one (docs/results/cpu_hosts.md).
  """
  import os

  model, mhz, flags = "", 0.0, set()
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
          model = value.strip()
        elif key == "cpu MHz" and not mhz:
          mhz = float(value)
        elif key == "flags" and not flags:
          flags = set(value.split())
  except (OSError, ValueError):
    pass
  simd = (
    "avx512"
    if "avx512f" in flags
    else "avx2"
    if {"avx2", "fma"} <= flags
    else "other"
    if flags
    else ""
  )
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"model": model, "cores": int(cores or 0), "mhz": mhz, "simd": simd}


def describe_host() -> str:
  """One log line's worth of :func:`cpu_info`, e.g. ``AMD EPYC x2 cores, 2596 MHz, avx512``."""
  c = cpu_info()
  return (
    f"{c['model'] or 'unknown CPU'} x{c['cores']} cores, {c['mhz']:.0f} MHz, {c['simd'] or '?'}"
  )


def restore_mapper(workdir: str, which: str | int = "best"):
  """Loads a trained (or imported) latent mapper from a workdir.

  Returns ``(mapper, config, step)``: the ``ResAttnUNet_DS`` NNX model (params on the default
  device, compute dtype from ``config.precision``), the run's resolved config, and the step.
  """

  import jax
  from flax import nnx

  from gms_jax import tokenizers
  from gms_jax.models import latent_mapper

  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True, async_save=False)
  try:
    meta = RunMetadata.read(ckpt)
    config = meta.run_config
    step = ckpt_lib.resolve_step(ckpt, which)
    dtype = tokenizers.compute_dtype(config.get("precision", "float32"))
    graphdef, abstract_state = nnx.split(latent_mapper.abstract(meta.mapper, dtype), nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      nnx.to_pure_dict(abstract_state),
    )
    params = ckpt.restore_params(step, abstract_params)
  finally:
    ckpt.close()
  return nnx.merge(graphdef, params), config, step
