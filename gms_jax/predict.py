"""Prediction: the Python ``Segmenter`` API and ``gms-jax predict``.

    seg = Segmenter.from_workdir("runs/busi")            # best-on-validation checkpoint
    masks = seg.predict(["a.png", "b.jpg"])             # list of bool (h, w) at each native size
    probs = seg.predict_probs(batch01)                   # (N, S, S) in [0, 1], S = image_size

Any size, greyscale/RGB/RGBA input; the model runs at the training resolution and the probability
map is resized (bilinear) back to the input's native size, then thresholded at 0.5 (METHOD §4).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

from gms_jax import errors, outputs
from gms_jax.data.formats import IMAGE_EXTENSIONS

# The names of inference.TTA_VIEWS, here so the CLIs' --help does not import jax (a test checks they agree).
TTA_CHOICES = ("none", "flip", "d4")
TTA_HELP = (
  "test-time augmentation: 'none' (SPEC §4, default), 'flip' (+ left-right flip, 2 passes) or "
  "'d4' (all flips and 90° rotations, 8 passes); the views' probabilities are averaged"
)
FUSION_HELP = (
  "CPU only: XLA library fusions for the inference jit, '' (XLA's defaults) or a comma list "
  "such as 'dot,reduce' (1.5x faster encodes on an AVX2 host, benchmarks/cpu_fusion.py); "
  "default: the workdir's config.cpu_library_fusion"
)


def resize_probs(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of one (S, S) probability map (or (S, S, K) class scores, each channel on
  its own) to ``size`` = (h, w)."""
  from PIL import Image

  h, w = int(size[0]), int(size[1])
  probs = np.asarray(probs, np.float32)
  if probs.shape[:2] == (h, w):
    return probs.astype(np.float32)
  if probs.ndim == 3:
    return np.stack([resize_probs(probs[..., k], size) for k in range(probs.shape[-1])], axis=-1)
  img = Image.fromarray(probs, mode="F")
  return np.asarray(img.resize((w, h), Image.BILINEAR), np.float32)


def save_mask_png(path: str, mask: np.ndarray, *, labels: bool = False) -> None:
  """Writes a binary mask as an 8-bit 0/255 PNG atomically (temp name, then rename); with
  ``labels`` a label map of class ids as they are (8-bit, nnU-Net's convention)."""
  from PIL import Image

  m = np.asarray(mask)
  arr = m.astype(np.uint8) if labels else np.where(m > 0, 255, 0).astype(np.uint8)
  img = Image.fromarray(arr, mode="L")
  outputs.write_atomic(path, lambda tmp: img.save(tmp, format="PNG"), suffix=".png")


class Segmenter:
  """A trained GMS model (frozen tokenizer + latent mapper) ready for inference."""

  def __init__(
    self,
    mapper,
    tokenizer,
    *,
    image_size: int,
    batch_size: int = 8,
    step: int | None = None,
    config=None,
    tta: str = "none",
    cpu_library_fusion: str = "",
    classes=None,
  ):
    """``classes`` (:class:`gms_jax.classes.Classes`): default from ``config``, else from the
    mapper's out channels (one latent per foreground class: the channels coding)."""
    import jax
    from flax import nnx

    from gms_jax import configuration, inference
    from gms_jax import step as step_lib

    self.tokenizer = tokenizer
    self.image_size = int(image_size)
    self.batch_size = int(batch_size)
    self.step = step
    self.config = config
    self.tta = inference.check_tta(tta)  # "none" (METHOD §4), "flip" or "d4" (inference.TTA_VIEWS)
    # A value from a config or the API: the error names config.cpu_library_fusion (the CLIs check their flag first).
    self.cpu_library_fusion = ",".join(configuration.cpu_library_fusions(cpu_library_fusion or ""))
    self._graphdef, self._params = nnx.split(mapper, nnx.Param)
    tok = tokenizer
    self.classes = classes if classes is not None else _classes_of(mapper, tokenizer, config)
    classes_ = self.classes

    def _probs(mapper_params, tok_params, images01):
      return inference.predict_probs(
        self._graphdef, mapper_params, tok, tok_params, images01, classes=classes_
      )

    self._probs = jax.jit(
      _probs, compiler_options=step_lib.cpu_compiler_options(self.cpu_library_fusion)
    )

  # ------------------------------------------------------------------ constructors
  @classmethod
  def from_workdir(
    cls,
    workdir: str,
    which: str | int = "best",
    *,
    batch_size: int = 8,
    tta: str = "none",
    cpu_library_fusion: str | None = None,
  ) -> "Segmenter":
    """Loads the checkpoint ``which`` ("best" on validation Dice, "latest", or a step);
    ``cpu_library_fusion`` None = the workdir's ``config.cpu_library_fusion``."""
    from gms_jax import run_metadata, tokenizers

    check_workdir(workdir)
    with _quiet_absl_warnings():  # orbax warns that a read-only manager does not save
      mapper, config, step = run_metadata.restore_mapper(workdir, which)
    tok = tokenizers.from_config(config)
    if cpu_library_fusion is None:
      cpu_library_fusion = str(config.get("cpu_library_fusion", "") or "")
    return cls(
      mapper,
      tok,
      image_size=config.data.image_size,
      batch_size=batch_size,
      step=step,
      config=config,
      tta=tta,
      cpu_library_fusion=cpu_library_fusion,
    )

  @classmethod
  def from_pretrained(
    cls,
    mapper: str,
    tokenizer,
    *,
    image_size: int = 224,
    family: str | None = None,
    batch_size: int = 8,
    tta: str = "none",
    cpu_library_fusion: str = "",
    classes=None,
  ) -> "Segmenter":
    """Without a workdir: ``mapper`` = official ``best_model.pth``, a ``gms-jax convert`` output or
    a workdir; ``tokenizer`` = a loaded :class:`gms_jax.tokenizers.Tokenizer`, or its weights (a
    path or ``hf:`` id; ``""`` = the packaged TAEF2) of tokenizer ``family`` (default: ``"tae"``
    for ``""`` and the TAESD ``hf:`` ids, else ``"sd-vae"``). ``classes``: a
    :class:`gms_jax.classes.Classes` (default: from the mapper's out channels, one latent per
    foreground class; a palette-coded mapper needs it given)."""
    from gms_jax import pretrained, tokenizers

    if not isinstance(tokenizer, tokenizers.Tokenizer):
      tokenizer = str(tokenizer)
      if family is None:
        from gms_jax.convert import hub

        family = (
          "tae"
          if not tokenizer
          else hub.family_of(tokenizer)
          if hub.is_hf_id(tokenizer)
          else "sd-vae"
        )
      tokenizer = tokenizers.load(family, tokenizer or tokenizers.packaged_path(family))
    weights = pretrained.read_mapper(mapper)
    weights.check_channels(
      tokenizer.latent_channels,
      tokenizer.family,
      classes.mask_latent_channels(tokenizer.latent_channels)
      if classes is not None
      else weights.cfg.out_channels,
    )
    return cls(
      pretrained.to_mapper(weights),
      tokenizer,
      image_size=image_size,
      batch_size=batch_size,
      step=weights.step,
      tta=tta,
      cpu_library_fusion=cpu_library_fusion,
      classes=classes,
    )

  # ------------------------------------------------------------------ inference
  def predict_probs(self, images01: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) float images in [0,1] at the model resolution -> (N, S, S) probabilities
    (C > 2 classes: (N, S, S, K) class scores, :meth:`gms_jax.classes.Classes.scores`).

    Runs in fixed-size batches (the last one padded) so only one shape is ever compiled; with
    ``tta`` other than ``"none"``, once per view, averaged (:func:`gms_jax.inference.tta_probs`).
    """
    images01 = np.asarray(images01, np.float32)
    if images01.ndim != 4 or images01.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(
        f"expected (N, {self.image_size}, {self.image_size}, 3) images, got {images01.shape}"
      )
    from gms_jax import inference

    once = lambda x: inference.in_fixed_batches(  # noqa: E731
      lambda chunk: self._probs(self._params, self.tokenizer.params, chunk), x, self.batch_size
    )
    return inference.tta_probs(once, images01, self.tta)  # "none" = the one identity view

  def predict(
    self, images: Sequence[str | np.ndarray], threshold: float = 0.5
  ) -> list[np.ndarray]:  # docs/METHOD.md §4
    """Paths or uint8 arrays (any size, L/RGB/RGBA) -> bool masks at each native size (C > 2
    classes: uint8 label maps of class ids; ``threshold`` applies to binary masks only)."""
    from gms_jax.data import pipeline

    raw = [
      pipeline.load_image_file(x) if isinstance(x, (str, os.PathLike)) else _to_rgb(x)
      for x in images
    ]
    batch = (
      np.stack([pipeline.preprocess_image(r, self.image_size) for r in raw])
      if raw
      else np.zeros((0, self.image_size, self.image_size, 3), np.float32)
    )
    probs = self.predict_probs(batch)
    if not self.classes.binary:
      return [self.classes.labels(resize_probs(p, r.shape[:2])) for p, r in zip(probs, raw)]
    return [resize_probs(p, r.shape[:2]) > threshold for p, r in zip(probs, raw)]


def _classes_of(mapper, tokenizer, config):
  """The :class:`gms_jax.classes.Classes` of a config, or (no config) of the mapper's shape."""
  from gms_jax import classes as classes_lib

  if config is not None:
    return classes_lib.from_config(config)
  k = int(mapper.cfg.out_channels) // max(int(tokenizer.latent_channels), 1)
  return classes_lib.Classes(k + 1 if k > 1 else 2)


def _to_rgb(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == 2:
    x = np.repeat(x[..., None], 3, axis=-1)
  elif x.ndim == 3 and x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  elif x.ndim == 3 and x.shape[-1] == 4:
    x = x[..., :3]
  if x.ndim != 3 or x.shape[-1] != 3:
    raise ValueError(f"image array must be (h,w), (h,w,1), (h,w,3) or (h,w,4); got {x.shape}")
  if x.dtype != np.uint8:
    raise ValueError(f"image array must be uint8, got {x.dtype}")
  return x


class _quiet_absl_warnings:
  """Raises the ``absl`` logger to ERROR for the duration (orbax's read-only notices)."""

  def __enter__(self):
    import logging

    self._logger = logging.getLogger("absl")
    self._level = self._logger.level
    self._logger.setLevel(logging.ERROR)
    return self

  def __exit__(self, *a):
    self._logger.setLevel(self._level)
    return False


def check_workdir(workdir: str) -> None:
  """One-line errors for a path that is not a trained workdir (before orbax is asked)."""
  from gms_jax import checkpoint

  if not os.path.isdir(workdir):
    raise errors.UsageError(f"--workdir {workdir}: no such folder")
  if not os.path.isfile(os.path.join(workdir, checkpoint.CONFIG_FILE)):
    raise errors.UsageError(
      f"--workdir {workdir}: not a gms-jax workdir (no "
      f"{checkpoint.CONFIG_FILE}; train or import one first)"
    )
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  if not os.path.isdir(ckpt_dir) or not any(n.isdigit() for n in os.listdir(ckpt_dir)):
    raise errors.UsageError(
      f"--workdir {workdir}: holds no checkpoint yet (training has not saved one)"
    )


def parse_checkpoint(value: str) -> str | int:
  """``--checkpoint``: "best", "latest" or a step number."""
  v = str(value).strip()
  if v in ("best", "latest"):
    return v
  if v.isdigit():
    return int(v)
  raise errors.UsageError(f"--checkpoint must be 'best', 'latest' or a step number, got {value!r}")


def parse_fusion(value: str | None) -> tuple[str, ...]:
  """``--cpu-library-fusion`` (the CLIs' flag): names of ``configuration.CPU_LIBRARY_FUSIONS``;
  UsageError (one line) naming the flag and what is not one."""
  from gms_jax import configuration

  try:
    return configuration.cpu_library_fusions(value or "")
  except errors.ConfigError as e:
    raise errors.UsageError(
      str(e).replace("config.cpu_library_fusion", "--cpu-library-fusion", 1)
    ) from None


def collect_images(inputs: Iterable[str], not_images: list[str] | None = None) -> list[str]:
  """Image files named directly or found (recursively, sorted) in the named folders; every other
  file found in a folder is appended to ``not_images`` (the command lists them)."""
  files = []
  for item in inputs:
    if os.path.isdir(item):
      for root, dirs, names in os.walk(item):
        dirs.sort()
        for n in sorted(names):
          if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."):
            files.append(os.path.join(root, n))
          elif not_images is not None:
            not_images.append(os.path.join(root, n))
    elif os.path.isfile(item):
      files.append(item)
    else:
      raise errors.MissingPathError(f"{item}: no such file or folder")
  seen, unique = set(), []
  for f in files:  # an image named twice (a file and its folder) is segmented once
    key = os.path.realpath(f)
    if key not in seen:
      seen.add(key)
      unique.append(f)
  return unique


def output_names(files: Sequence[str]) -> list[str]:
  """Relative output paths (``.png``) that keep the inputs' relative paths below their common
  folder, so ``a/x.png`` and ``b/x.png`` never collide; ``x.png`` + ``x.jpg`` in one folder
  become ``x.png.png`` and ``x.jpg.png``."""
  if not files:
    return []
  absolute = [os.path.abspath(f) for f in files]
  root = os.path.commonpath([os.path.dirname(a) for a in absolute])
  rel = [os.path.relpath(a, root) for a in absolute]
  stems = [os.path.splitext(r)[0] for r in rel]
  counts: dict[str, int] = {}
  for s in stems:
    counts[s] = counts.get(s, 0) + 1
  return [(s if counts[s] == 1 else r) + ".png" for s, r in zip(stems, rel)]


def predict_files(
  seg: "Segmenter", files: Sequence[str], names: Sequence[str], out: str
) -> tuple[int, list[tuple[str, str]]]:
  """Segments ``files`` into ``out/<names[i]>`` (0/255 PNG masks at native size; label maps of
  class ids for C > 2 classes), 64 at a time.

  One bad file costs only itself: returns ``(written, [(path, reason), ...] skipped)``. The
  folder's manifest lists every file this call may write before it writes one, so an interrupted
  run's folder is still recognised as ours."""
  from gms_jax.data import pipeline

  previous = outputs.read_manifest(out) or {"files": []}
  outputs.remove_own_temporaries(out) if os.path.isdir(out) else None  # a killed run's
  done = {n for n in previous["files"] if os.path.isfile(os.path.join(out, n))}
  # Planned files are listed before any is written, so a killed run's folder is still ours.
  outputs.write_manifest(out, "predict", done, planned=sorted(set(names)))
  skipped: list[tuple[str, str]] = []
  written = 0
  for start in range(0, len(files), 64):
    chunk = list(zip(files[start : start + 64], names[start : start + 64]))
    images, targets = [], []
    for path, name in chunk:
      try:
        images.append(pipeline.load_image_file(path))
        targets.append((path, name))
      except Exception as e:  # one bad file costs only itself
        skipped.append((path, errors.describe(e).replace(f"{path}: ", "", 1)))
    if not images:
      continue
    for (path, name), mask in zip(targets, seg.predict(images)):
      try:
        save_mask_png(os.path.join(out, name), mask, labels=not seg.classes.binary)
        written += 1
        done.add(name)
      except OSError as e:
        skipped.append((path, errors.describe(e)))
    outputs.write_manifest(out, "predict", done, planned=sorted(set(names)))
  outputs.write_manifest(out, "predict", done)  # finished: only the files that exist
  return written, skipped
