"""Mapper weights in and out of workdirs: ``gms-jax import``, ``gms-jax export`` and ``mapper.init``.

A mapper checkpoint can be any of:

* the official GMS ``best_model.pth`` (torch pickle ``{"model": state_dict}``), or the same state
  dict as safetensors (what ``gms-jax export --format safetensors`` writes);
* a Flax parameter file written by ``gms-jax convert --format gms-mapper``;
* a gms-jax workdir (its best checkpoint, or ``which``).

:func:`read_mapper` turns each into :class:`MapperWeights` (flat Flax params + ``MapperConfig`` +
provenance).  :func:`import_workdir` writes them as step 0 of a new workdir, with the same
checkpoint layout and metadata as ``gms-jax train`` (fresh optimizer state, the run's noise key;
no data iterator: a resumed run starts its data order from the beginning), so ``evaluate``,
``predict``, ``Segmenter.from_workdir`` and ``train`` (= fine-tune) accept it as a trained one.
:func:`export_mapper` writes a workdir's mapper back in the official format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from typing import Any, Mapping

import numpy as np

from gms_jax import errors, outputs
from gms_jax.convert import core
from gms_jax.lock import WorkdirLock
from gms_jax.models.latent_mapper import MapperConfig


class WeightsError(errors.ConfigError):
  """Mapper weights do not fit the run (e.g. channel count vs the tokenizer); one line, exit 2."""


@dataclasses.dataclass(frozen=True)
class MapperWeights:
  """Flat Flax params of a latent mapper, its config, and where they came from."""

  flat: dict[str, np.ndarray]
  cfg: MapperConfig
  source: str  # absolute path of the file or workdir
  format: str  # "gms-torch" | "gms-jax-convert" | "gms-jax-workdir"
  sha256: str | None = None  # of the file (None for a workdir)
  step: int | None = None  # the workdir's step

  def provenance(self, how: str) -> dict[str, Any]:
    """The ``init`` entry of :class:`gms_jax.run_metadata.RunMetadata`."""
    d = {"how": how, "source": self.source, "format": self.format, "sha256": self.sha256}
    if self.step is not None:
      d["step"] = int(self.step)
    return d

  def check_channels(
    self, latent_channels: int, tokenizer: str, out_channels: int | None = None
  ) -> None:
    """One clear error when the mapper's in channels are not the tokenizer's latent channels, or
    its out channels not ``out_channels`` (default: the latent channels, a binary task; one
    latent per foreground class with the channels coding, docs/METHOD.md §7)."""
    out = latent_channels if out_channels is None else int(out_channels)
    if self.cfg.in_channels != latent_channels or self.cfg.out_channels % latent_channels:
      raise WeightsError(
        f"{self.source}: the mapper maps {self.cfg.in_channels} -> {self.cfg.out_channels} latent "
        f"channels but the tokenizer {tokenizer} has {latent_channels}; use the tokenizer the mapper "
        "was trained with (--config.tokenizer.name / --config.tokenizer.path)"
      )
    if self.cfg.out_channels != out:
      k = self.cfg.out_channels // latent_channels
      raise WeightsError(
        f"{self.source}: the mapper predicts {k} mask latent(s) ({self.cfg.out_channels} "
        f"channels) but the run needs {out // latent_channels} ({out}); set "
        f"--config.data.num_classes={k + 1 if k > 1 else 2} (and --config.mask_coding) to match "
        "the weights"
      )

  def check_config(self, cfg: MapperConfig) -> None:
    """Errors naming every ``MapperConfig`` field where ``cfg`` (the run's) differs from the weights."""
    diff = [
      f"{f.name}={getattr(cfg, f.name)!r} (weights: {getattr(self.cfg, f.name)!r})"
      for f in dataclasses.fields(MapperConfig)
      if getattr(cfg, f.name) != getattr(self.cfg, f.name)
    ]
    if diff:
      raise WeightsError(
        f"{self.source}: the run's mapper config does not fit the weights: "
        + ", ".join(diff)
        + " (set --config.mapper.ch / ch_mult to match)"
      )


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _is_workdir(path: str) -> bool:
  from gms_jax import checkpoint

  return os.path.isdir(checkpoint.checkpoint_dir(path))


def read_mapper(path: str, *, which: str | int = "best") -> MapperWeights:
  """Any mapper checkpoint (see the module docstring) -> :class:`MapperWeights` (strict)."""
  path = os.path.abspath(os.path.expanduser(str(path)))
  if os.path.isdir(path):
    if not _is_workdir(path):
      raise errors.MissingPathError(
        f"{path}: a folder, but not a gms-jax workdir (no checkpoints/)"
      )
    from gms_jax import run_metadata

    model, _, step = run_metadata.restore_mapper(path, which)
    return MapperWeights(
      flat=core.model_to_flat(model),
      cfg=model.cfg,
      source=path,
      format="gms-jax-workdir",
      step=step,
    )
  if not os.path.isfile(path):
    raise errors.MissingPathError(f"{path}: no such mapper checkpoint")
  from gms_jax.convert import mapper as conv

  if core.is_flax_params_file(path):
    flat, family, cfg_dict = core.load_params(path)
    if family != conv.FAMILY:
      raise core.ConversionError(f"{path}: holds {family!r} parameters, not a latent mapper")
    cfg = MapperConfig.from_dict(cfg_dict)
    core.check_flat(flat, conv.target_shapes(cfg), source=path)
    fmt = "gms-jax-convert"
  else:
    flat, cfg = conv.load_gms_mapper(path)
    fmt = "gms-torch"
  return MapperWeights(flat=dict(flat), cfg=cfg, source=path, format=fmt, sha256=sha256_file(path))


def nested_params(weights: MapperWeights) -> dict[str, Any]:
  """The pure nested dict (``nnx.to_pure_dict`` layout) of the params, as numpy arrays."""
  from flax import nnx

  from gms_jax.models import latent_mapper

  tree = nnx.to_pure_dict(nnx.state(latent_mapper.abstract(weights.cfg), nnx.Param))
  import jax

  def leaf(path, _):
    return np.asarray(weights.flat["/".join(str(getattr(k, "key", k)) for k in path)], np.float32)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def to_mapper(weights: MapperWeights, dtype=None):
  """An NNX ``ResAttnUNet_DS`` holding the weights (``dtype`` = compute dtype)."""
  from gms_jax.models import latent_mapper

  model = latent_mapper.abstract(weights.cfg, dtype)
  core.apply_flat(model, weights.flat, source=weights.source)
  return model


# ----------------------------------------------------------------------------- import


def import_workdir(config, mapper_path: str, workdir: str, *, tokenizer=None) -> dict[str, Any]:
  """Writes ``mapper_path`` + the config's tokenizer as step 0 of the new workdir ``workdir``.

  ``config.mapper.ch`` / ``ch_mult`` are set from the weights.  Refuses an existing non-empty
  ``workdir``; nothing is created before every check has passed.  Returns a summary dict.
  """
  import jax
  import jax.numpy as jnp

  from gms_jax import checkpoint as ckpt_lib
  from gms_jax import run_metadata, tokenizers
  from gms_jax import step as step_lib

  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise errors.OutputError(
      f"{workdir}: exists and is not empty; import writes a new workdir "
      "(choose another --workdir; existing outputs are never overwritten)"
    )
  from gms_jax import classes as classes_lib

  weights = read_mapper(mapper_path)
  tok = tokenizer if tokenizer is not None else tokenizers.from_config(config)
  k = weights.cfg.out_channels // max(tok.latent_channels, 1)
  if str(config.data.get("root", "") or "") or config.data.name == "sample":
    from gms_jax.train import resolve_classes

    resolve_classes(config)  # the data's classes and names, as train records them
  with config.unlocked():
    if int(config.data.get("num_classes", 0) or 0) == 0:
      # the weights say: one mask latent per foreground class (channels coding), else binary
      config.data.num_classes = k + 1 if k > 1 else 2
  weights.check_channels(
    tok.latent_channels,
    f"{config.tokenizer.name!s} ({config.tokenizer.path or 'packaged'})",
    classes_lib.from_config(config).mask_latent_channels(tok.latent_channels),
  )
  with config.unlocked():
    config.mapper.ch = weights.cfg.ch
    config.mapper.ch_mult = tuple(weights.cfg.ch_mult)
  run_cfg = step_lib.mapper_config(config, tok)
  weights.check_config(run_cfg)

  # The state train's init builds (step.make_state_fn), with these params.
  params = jax.tree.map(jnp.asarray, nested_params(weights))
  tx = step_lib.make_optimizer(config, step_lib.make_schedule(config, 1))
  state = step_lib.make_state_fn(run_cfg, None, tx, int(config.seed), params=params)()
  meta = run_metadata.RunMetadata.for_run(config, run_cfg, tok, init=weights.provenance("import"))

  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  lock = WorkdirLock(workdir, "import")
  try:
    lock.acquire()  # a concurrent import or train of the same new workdir is refused
  except BaseException:
    if created and not os.listdir(workdir):
      os.rmdir(workdir)
    raise
  try:
    with open(os.path.join(workdir, ckpt_lib.CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    ckpt = ckpt_lib.Checkpointer(
      workdir, keep=int(config.keep_checkpoints), metadata=meta.to_dict(), async_save=False
    )
    ckpt.save(0, state)
    ckpt.wait()
    ckpt.close()
  except BaseException:  # remove only what this call made (the folder was missing or empty)
    if created:
      shutil.rmtree(workdir, ignore_errors=True)
    else:
      for name in os.listdir(workdir):
        entry = os.path.join(workdir, name)
        if os.path.isdir(entry):
          shutil.rmtree(entry, ignore_errors=True)
        else:
          os.remove(entry)
    raise
  finally:
    lock.release()
  return {
    "workdir": workdir,
    "source": weights.source,
    "sha256": weights.sha256,
    "format": weights.format,
    "mapper": run_cfg.to_dict(),
    "tokenizer": meta.tokenizer,
  }


# ----------------------------------------------------------------------------- export

EXPORT_FORMATS = ("pth", "safetensors")


def official_state_dict(weights: MapperWeights) -> dict[str, np.ndarray]:
  """The official ``ResAttnUNet_DS`` state dict (numpy), PReLU slopes under both names."""
  from gms_jax.convert import mapper as conv

  return conv.to_state_dict(weights.flat)


def save_official(state_dict: Mapping[str, np.ndarray], out: str, fmt: str = "pth") -> None:
  """``pth``: ``torch.save({"model": state_dict})`` (aliases share one tensor, as in the original);
  ``safetensors``: the same keys and tensors, readable without torch."""
  if fmt == "pth":
    try:
      torch = core.torch_module()
    except ImportError:
      raise errors.GmsError(
        "--format pth writes a PyTorch pickle and needs torch: pip install 'gms-jax[torch]', or "
        "use --format safetensors (the same state dict, no torch)"
      ) from None
    tensors, sd = {}, {}
    for k, v in state_dict.items():  # one tensor per array: the PReLU alias stays shared
      sd[k] = tensors.setdefault(id(v), torch.from_numpy(np.array(v, np.float32)))

    def write(tmp):
      with open(tmp, "wb") as f:
        torch.save({"model": sd}, f)

    outputs.write_atomic(out, write)
  elif fmt == "safetensors":
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()}
    outputs.write_atomic(out, lambda tmp: save_file(arrays, tmp, metadata={"format": "pt"}))
  else:
    raise ValueError(f"unknown export format {fmt!r}; one of {EXPORT_FORMATS}")


def export_mapper(workdir: str, out: str, *, which: str | int = "best", fmt: str = "pth") -> dict:
  """Writes the mapper of ``workdir`` (checkpoint ``which``) to ``out`` in the official format."""
  if os.path.exists(out):
    raise errors.OutputError(f"{out}: exists; export never replaces a file (choose another OUT)")
  if not _is_workdir(workdir):
    raise errors.UsageError(f"--workdir {workdir}: not a gms-jax workdir (no checkpoints/)")
  weights = read_mapper(workdir, which=which)
  sd = official_state_dict(weights)
  save_official(sd, out, fmt)
  return {
    "out": os.path.abspath(out),
    "step": weights.step,
    "keys": len(sd),
    "params": sum(int(v.size) for v in weights.flat.values()),
  }
