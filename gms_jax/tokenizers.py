"""Frozen image tokenizers: images <-> latents, and latents -> grey masks (docs/METHOD.md §1, §3).

A :class:`Tokenizer` holds an NNX ``graphdef``, its frozen ``params`` (an ``nnx.State``) and the
family's conventions.  Its methods are pure functions of ``(params, array)`` and jit-able; pass
``tok.params`` to jitted code as its own (non-donated) argument::

    tok = load("taef2", "weights/taef2")              # or load("sd-vae", "vae.safetensors")
    lat = tok.encode(tok.params, images01)            # NHWC [0,1] -> Latents(z, std)
    x01 = tok.decode(tok.params, lat.z)               # -> NHWC [0,1]
    m01 = tok.decode_mask(tok.params, lat.z)          # -> NHW grey mask in [0,1]

Families (:data:`REGISTRY`; weights from a path or an ``hf:OWNER/REPO[@REV][/SUB]`` id):

* ``"sd-vae"`` (any LDM/diffusers KL autoencoder; SD kl-f8 for GMS): ``encode``: ``x = 2*img - 1``
  -> ``(mean, logvar)``; ``z = scale * mean`` (0.18215, or the VAE's ``config.json``) and ``std = exp(logvar / 2)`` *unscaled*, exactly as the
  original adds it to the scaled mean.  ``decode``: ``vae.decode(z / scale)`` -> ``(x+1)/2`` -> clip.
  ``decode_mask``: ``vae.decode(z / scale)`` -> mean over RGB -> ``(x+1)/2`` -> clip [0,1].
* ``"tae"`` (TAESD family: TAEF2, TAESD, TAESDXL, TAEF1): ``z = encoder(img)`` (scale 1, no posterior: ``std`` is 0);
  ``decode``: decoder output (already about [0,1]) clipped; ``decode_mask``: its RGB mean, clipped.

``remat_decoder=True`` rematerialises the decoder block by block (``jax.checkpoint`` per block:
the training loss backpropagates through it, and this keeps only block inputs between the passes);
``dtype`` is the compute dtype the model is built with (params stay float32; outputs
are float32).  I/O lives here and in :mod:`gms_jax.convert`; models do none.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gms_jax.convert import core


@dataclasses.dataclass(frozen=True)
class Family:
  """A tokenizer family: where its model and converter live and its conventions.

  ``models.<module>`` holds the config dataclass and the NNX model (no I/O);
  ``convert.<module>.load(path, **kw) -> (flat params, config)`` reads its checkpoints."""

  name: str
  module: str
  config_class: str
  model_class: str
  signed: bool  # the model's images are in [-1, 1] (else [0, 1])
  posterior: bool  # encode returns (mean, logvar) (else the latent itself)
  scale: Callable[[Any], float]  # config -> latent scale
  downsample: Callable[[Any], int]  # config -> image/latent size ratio

  def config_cls(self):
    return getattr(importlib.import_module(f"gms_jax.models.{self.module}"), self.config_class)

  def model_cls(self):
    return getattr(importlib.import_module(f"gms_jax.models.{self.module}"), self.model_class)

  def converter(self):
    return importlib.import_module(f"gms_jax.convert.{self.module}")


REGISTRY = {
  "sd-vae": Family(
    "sd-vae",
    "sd_vae",
    "AutoencoderKLConfig",
    "AutoencoderKL",
    signed=True,
    posterior=True,
    scale=lambda c: float(c.scaling_factor),
    downsample=lambda c: int(c.downsample_factor),
  ),
  "tae": Family(
    "tae",
    "tae",
    "TAEConfig",
    "TAE",
    signed=False,
    posterior=False,
    scale=lambda c: 1.0,
    downsample=lambda c: 8,
  ),
}
_ALIASES = {
  "sd-vae": "sd-vae",
  "sd_vae": "sd-vae",
  "sd": "sd-vae",
  "tae": "tae",
  "taef2": "tae",
  "taesd": "tae",
  "taesdxl": "tae",
  "taef1": "tae",
  "taesd3": "tae",
}


class Latents(NamedTuple):
  """``z``: the (scaled) latent; ``std``: the posterior std, unscaled (zeros without a posterior)."""

  z: jax.Array
  std: jax.Array


def canonical_family(family: str) -> str:
  try:
    return _ALIASES[family.lower()]
  except KeyError:
    raise ValueError(f"unknown tokenizer family {family!r}; one of {sorted(_ALIASES)}") from None


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable as a jit static arg
class Tokenizer:
  """A frozen autoencoder and its conventions; all methods take ``params`` explicitly."""

  family: str
  graphdef: Any
  params: nnx.State
  scale: float
  latent_channels: int
  downsample: int = 8
  remat_decoder: bool = False
  dtype: Any = None
  config: Any = None  # the model's config dataclass (for saving / display)
  signed: bool = False  # the model's images are in [-1, 1] (SD) rather than [0, 1] (TAE)
  posterior: bool = False  # the model's encode returns (mean, logvar)

  @property
  def has_posterior(self) -> bool:
    """Whether ``encode`` returns a meaningful ``std`` (SD VAE) or zeros (TAE)."""
    return self.posterior

  # --------------------------------------------------------------------------- pure functions

  def _model(self, params):
    return nnx.merge(self.graphdef, params)

  def _check_images(self, images01):
    if images01.ndim != 4 or images01.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images, got shape {images01.shape}")
    if images01.shape[1] % self.downsample or images01.shape[2] % self.downsample:
      raise ValueError(f"image size {images01.shape[1:3]} is not a multiple of {self.downsample}")

  def encode(self, params, images01) -> Latents:
    """NHWC images in [0,1] -> :class:`Latents` ``(z, std)``, each (B, H/8, W/8, C), float32."""
    self._check_images(images01)
    x = jnp.asarray(images01, jnp.float32)
    model = self._model(params)
    if self.signed:
      x = 2.0 * x - 1.0
    if self.posterior:
      mean, logvar = model.encode(x)
      mean = mean.astype(jnp.float32)
      std = jnp.exp(logvar.astype(jnp.float32) / 2.0)
      return Latents(z=self.scale * mean, std=std)
    z = self.scale * model.encode(x).astype(jnp.float32)
    return Latents(z=z, std=jnp.zeros_like(z))

  def _decode_raw(self, params, z):
    """The model's own decoder output: SD in about [-1,1], TAE in about [0,1]; float32."""

    z = jnp.asarray(z, jnp.float32)
    x = self._model(params).decode(z / self.scale, remat=self.remat_decoder)
    return x.astype(jnp.float32)

  def decode(self, params, z) -> jax.Array:
    """Scaled latents -> NHWC images in [0,1] (clipped)."""
    x = self._decode_raw(params, z)
    if self.signed:
      x = (x + 1.0) / 2.0
    return jnp.clip(x, 0.0, 1.0)

  def decode_mask(self, params, z) -> jax.Array:
    """Scaled latents -> NHW grey masks in [0,1]: mean over RGB channels, clipped (METHOD §3)."""
    g = jnp.mean(self._decode_raw(params, z), axis=-1)
    if self.signed:
      g = (g + 1.0) / 2.0
    return jnp.clip(g, 0.0, 1.0)


# ----------------------------------------------------------------------------- construction


def _abstract(family: str, cfg, dtype):
  cls = REGISTRY[family].model_cls()
  return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), dtype=dtype))


def _make(family: str, graphdef, params, cfg, *, dtype, remat_decoder: bool) -> Tokenizer:
  fam = REGISTRY[family]
  return Tokenizer(
    family=family,
    graphdef=graphdef,
    params=params,
    scale=fam.scale(cfg),
    latent_channels=int(cfg.latent_channels),
    downsample=fam.downsample(cfg),
    remat_decoder=remat_decoder,
    dtype=dtype,
    config=cfg,
    signed=fam.signed,
    posterior=fam.posterior,
  )


def from_flat(
  family: str, flat, cfg, *, dtype=None, remat_decoder: bool = False, source: str = "params"
) -> Tokenizer:
  """Flat ``/``-joined Flax params (from a converter or ``core.load_params``) -> Tokenizer.

  The model is built abstractly (no random init) and filled strictly: any missing, extra or
  mis-shaped parameter raises :class:`gms_jax.convert.core.ConversionError`."""
  family = canonical_family(family)
  model = _abstract(family, cfg, dtype)
  core.apply_flat(model, flat, source=source)
  graphdef, params = nnx.split(model, nnx.Param)
  return _make(family, graphdef, params, cfg, dtype=dtype, remat_decoder=remat_decoder)


def from_model(
  family: str, model: nnx.Module, *, dtype=None, remat_decoder: bool = False
) -> Tokenizer:
  """Wraps an existing NNX model (e.g. random weights in tests); its ``cfg`` attribute is used.

  With ``dtype``, the graph is rebuilt with that compute dtype around the same params."""
  family = canonical_family(family)
  cfg = model.cfg
  if dtype is not None:
    return from_flat(
      family,
      core.model_to_flat(model),
      cfg,
      dtype=dtype,
      remat_decoder=remat_decoder,
      source="model",
    )
  graphdef, params = nnx.split(
    nnx.clone(model), nnx.Param
  )  # clone: later edits of `model` stay out
  return _make(
    family, graphdef, params, cfg, dtype=getattr(model, "dtype", None), remat_decoder=remat_decoder
  )


def abstract(family: str, cfg=None, *, dtype=None, remat_decoder: bool = False) -> Tokenizer:
  """A tokenizer of shapes only: ``params`` are ``jax.ShapeDtypeStruct`` leaves (no weights read,
  nothing allocated). Its methods trace like a real tokenizer's, so a step built with it can be
  ``.lower()``-ed and compiled for any target (``gms_jax.step``); ``cfg`` defaults to the family's
  standard architecture (docs/METHOD.md §1 SD-VAE, TAEF2)."""
  family = canonical_family(family)
  if cfg is None:
    cls = REGISTRY[family].config_cls()
    cfg = cls.sd() if family == "sd-vae" else cls.taef2()
  graphdef, params = nnx.split(_abstract(family, cfg, dtype), nnx.Param)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  return _make(family, graphdef, params, cfg, dtype=dtype, remat_decoder=remat_decoder)


def with_params(tok: Tokenizer, params: Any) -> Tokenizer:
  """``tok`` with other params of the same structure (e.g. random ones for timing)."""
  return dataclasses.replace(tok, params=params)


def shapes(tok: Tokenizer) -> Any:
  """The tokenizer's params as ``jax.ShapeDtypeStruct`` leaves (real or abstract tokenizer)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tok.params)


def _load_flax_file(family: str, path: str):
  flat, file_family, config = core.load_params(path)
  if canonical_family(file_family) != family:
    raise core.ConversionError(f"{path}: holds {file_family!r} parameters, not {family!r}")
  return flat, REGISTRY[family].config_cls().from_dict(config)


def load(
  family: str,
  path: str,
  *,
  dtype=None,
  remat_decoder: bool = False,
  cfg=None,
  scaling_factor: float | None = None,
) -> Tokenizer:
  """Loads a frozen tokenizer.

  Args:
    family: ``"sd-vae"`` or ``"tae"`` (aliases ``"taef2"``, ``"taesd"``).
    path: for ``"sd-vae"``: a converted Flax ``.safetensors`` (``gms-jax convert``), a diffusers
      folder / bare diffusers ``.safetensors`` / ``.bin``, or an LDM ``.ckpt`` / ``.pth``.
      For ``"tae"``: a folder with ``taef2_encoder.pth`` + ``taef2_decoder.pth`` (or one
      ``*encoder`` / ``*decoder`` pair), or a converted Flax ``.safetensors``.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); params stay float32.
    remat_decoder: rematerialise the decoder block by block in the backward pass.
      Either family: ``hf:OWNER/REPO[@REV][/SUBFOLDER]`` (:mod:`gms_jax.convert.hub`; converted on
      first use and cached next to the download).
    cfg: SD only: the expected architecture; it is read from the weights, and a ``cfg`` that
      contradicts them is an error naming the fields.
    scaling_factor: SD only: the latent scale (default: the VAE's ``config.json``, else 0.18215).
  """
  family = canonical_family(family)
  if str(path).startswith("hf:"):
    from gms_jax.convert import hub

    path = hub.resolve(str(path), family)
  if core.is_flax_params_file(path):
    flat, file_cfg = _load_flax_file(family, path)
    if cfg is not None and family == "sd-vae":
      from gms_jax.convert import sd_vae

      sd_vae.check_against(cfg, file_cfg, source=path)
    cfg = file_cfg
  else:
    flat, cfg = REGISTRY[family].converter().load(path, cfg=cfg)
  if scaling_factor:
    if not hasattr(cfg, "scaling_factor"):
      from gms_jax import errors

      raise errors.ConfigError(
        f"config.tokenizer.scaling_factor={scaling_factor}: {family!r} "
        "tokenizers have no latent scale (leave it 0)"
      )
    cfg = dataclasses.replace(cfg, scaling_factor=float(scaling_factor))
  return from_flat(family, flat, cfg, dtype=dtype, remat_decoder=remat_decoder, source=path)


def packaged_path(family: str) -> str:
  """Path of the weights shipped inside the package for ``family`` (only TAEF2 ships)."""
  import importlib.resources

  family = canonical_family(family)
  p = importlib.resources.files("gms_jax") / "assets" / "taef2.safetensors"
  if family != "tae" or not p.is_file():
    raise FileNotFoundError(
      f"no packaged weights for tokenizer family {family!r}: set the checkpoint path "
      "(--config.tokenizer.path); for 'sd-vae' that is your SD VAE (diffusers folder or "
      "safetensors, LDM .ckpt, or a `gms-jax convert` output)"
    )
  return os.fspath(p)


PRECISIONS = {"float32": None, "bfloat16": jnp.bfloat16}  # the one precision -> dtype table


def compute_dtype(precision: str):
  """``config.precision`` ("float32" / "bfloat16") -> the models' compute dtype (None = float32)."""
  if str(precision) not in PRECISIONS:
    raise ValueError(f"config.precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
  return PRECISIONS[str(precision)]


def from_config(config) -> Tokenizer:
  """The tokenizer a training config names: ``config.tokenizer.{name,path,remat_decoder}``
  at ``config.precision`` (``"float32"`` or ``"bfloat16"`` compute; params stay float32).
  An empty path means the packaged weights (TAEF2 only)."""
  t = config.tokenizer
  precision = str(config.get("precision", "float32"))
  path = str(t.path) or packaged_path(str(t.name))
  return load(
    str(t.name),
    path,
    dtype=compute_dtype(precision),
    remat_decoder=bool(t.get("remat_decoder", False)),
    scaling_factor=float(t.get("scaling_factor", 0.0) or 0.0) or None,
  )


def abstract_from_config(config) -> Tokenizer:
  """:func:`from_config` without weights (:func:`abstract`): the architecture of a converted Flax
  file named by ``config.tokenizer.path`` (its metadata only), else the family's standard one."""
  t = config.tokenizer
  precision = str(config.get("precision", "float32"))
  family, cfg, path = canonical_family(str(t.name)), None, str(t.path)
  if path and core.is_flax_params_file(path):
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
    if meta.get("config"):
      cfg = REGISTRY[family].config_cls().from_dict(json.loads(meta["config"]))
  elif family == "tae" and hasattr(REGISTRY[family].config_cls(), str(t.name).lower()):
    cfg = getattr(REGISTRY[family].config_cls(), str(t.name).lower())()  # e.g. TAEConfig.taesd()
  tok = abstract(
    family, cfg, dtype=compute_dtype(precision), remat_decoder=bool(t.get("remat_decoder", False))
  )
  scale = float(t.get("scaling_factor", 0.0) or 0.0)
  if scale and hasattr(tok.config, "scaling_factor"):
    tok = abstract(
      family,
      dataclasses.replace(tok.config, scaling_factor=scale),
      dtype=tok.dtype,
      remat_decoder=tok.remat_decoder,
    )
  return tok


def save(tok: Tokenizer, path: str) -> None:
  """Writes the tokenizer's params as a converted Flax ``.safetensors`` that :func:`load` reads."""
  flat = {
    "/".join(str(p) for p in k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(tok.params)
  }
  core.save_params(path, flat, family=tok.family, config=tok.config.to_dict())


def describe(tok: Tokenizer) -> str:
  n = sum(int(x.size) for x in jax.tree.leaves(tok.params))
  return (
    f"{tok.family} tokenizer: {n:,} params, latent {tok.latent_channels}ch /{tok.downsample}, "
    f"scale {tok.scale}, config {json.dumps(tok.config.to_dict())}"
  )
