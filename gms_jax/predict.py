"""Prediction: the Python ``Segmenter`` API and ``gms-jax predict``.

    seg = Segmenter.from_workdir("runs/busi")            # best-on-validation checkpoint
    masks = seg.predict(["a.png", "b.jpg"])             # list of bool (h, w) at each native size
    probs = seg.predict_probs(batch01)                   # (N, S, S) in [0, 1], S = image_size

Any size, greyscale/RGB/RGBA input; the model runs at the training resolution and the probability
map is resized (bilinear) back to the input's native size, then thresholded at 0.5 (SPEC §4).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Iterable, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def resize_probs(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of one (S, S) probability map to ``size`` = (h, w)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  h, w = int(size[0]), int(size[1])
  if probs.shape == (h, w):
    return probs.astype(np.float32)
  img = Image.fromarray(np.asarray(probs, np.float32), mode="F")
  return np.asarray(img.resize((w, h), Image.BILINEAR), np.float32)


def save_mask_png(path: str, mask: np.ndarray) -> None:
  """Writes a binary mask as an 8-bit 0/255 PNG atomically (temp name, then rename)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
  os.close(fd)
  try:
    Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), mode="L").save(tmp, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class Segmenter:
  """A trained GMS model (frozen tokenizer + latent mapper) ready for inference."""

  def __init__(self, mapper, tokenizer, *, image_size: int, batch_size: int = 8, step: int | None = None,
               config=None):
    import jax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from gms_jax import inference  # pylint: disable=import-outside-toplevel
    self.tokenizer = tokenizer
    self.image_size = int(image_size)
    self.batch_size = int(batch_size)
    self.step = step
    self.config = config
    self._graphdef, self._params = nnx.split(mapper, nnx.Param)
    tok = tokenizer

    def _probs(mapper_params, tok_params, images01):
      return inference.predict_probs(self._graphdef, mapper_params, tok, tok_params, images01)

    self._probs = jax.jit(_probs)

  # ------------------------------------------------------------------ constructors
  @classmethod
  def from_workdir(cls, workdir: str, which: str | int = "best", *, batch_size: int = 8) -> "Segmenter":
    """Loads the checkpoint ``which`` ("best" on validation Dice, "latest", or a step)."""
    from gms_jax import checkpoint, tokenizers  # pylint: disable=import-outside-toplevel
    mapper, config, step = checkpoint.restore_mapper(workdir, which)
    tok = tokenizers.from_config(config)
    return cls(mapper, tok, image_size=config.data.image_size, batch_size=batch_size, step=step, config=config)

  # ------------------------------------------------------------------ inference
  def predict_probs(self, images01: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) float images in [0,1] at the model resolution -> (N, S, S) probabilities.

    Runs in fixed-size batches (the last one padded) so only one shape is ever compiled.
    """
    images01 = np.asarray(images01, np.float32)
    if images01.ndim != 4 or images01.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"expected (N, {self.image_size}, {self.image_size}, 3) images, got {images01.shape}")
    out = []
    b = self.batch_size
    for i in range(0, len(images01), b):
      chunk = images01[i:i + b]
      n = len(chunk)
      if n < b:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
      out.append(np.asarray(self._probs(self._params, self.tokenizer.params, chunk))[:n])
    return np.concatenate(out) if out else np.zeros((0, self.image_size, self.image_size), np.float32)

  def predict(self, images: Sequence[str | np.ndarray], threshold: float = 0.5) -> list[np.ndarray]:
    """Paths or uint8 arrays (any size, L/RGB/RGBA) -> bool masks at each native size."""
    from gms_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    raw = [pipeline.load_image_file(x) if isinstance(x, (str, os.PathLike)) else _to_rgb(x) for x in images]
    batch = np.stack([pipeline.preprocess_image(r, self.image_size) for r in raw]) if raw else \
        np.zeros((0, self.image_size, self.image_size, 3), np.float32)
    probs = self.predict_probs(batch)
    return [resize_probs(p, r.shape[:2]) > threshold for p, r in zip(probs, raw)]


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


def collect_images(inputs: Iterable[str]) -> list[str]:
  """Image files named directly or found (recursively, sorted) in the named folders."""
  files = []
  for item in inputs:
    if os.path.isdir(item):
      for root, _, names in sorted(os.walk(item)):
        files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
    elif os.path.isfile(item):
      files.append(item)
    else:
      raise FileNotFoundError(f"{item}: no such file or folder")
  return files


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="gms-jax predict",
                                   description="Segment image files or folders with a trained workdir.")
  parser.add_argument("--workdir", required=True, help="training workdir (holds config.json and checkpoints)")
  parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
  parser.add_argument("--out", required=True, help="output folder for <stem>.png masks (0/255, native size)")
  parser.add_argument("--checkpoint", default="best", help="'best' (validation Dice), 'latest' or a step")
  parser.add_argument("--batch-size", type=int, default=8)
  args = parser.parse_args(argv)
  try:
    files = collect_images(args.inputs)
  except FileNotFoundError as e:
    print(f"gms-jax predict: error: {e}", file=sys.stderr)
    return 2
  if not files:
    print("gms-jax predict: error: no image files found in " + " ".join(args.inputs), file=sys.stderr)
    return 2
  which = int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint
  seg = Segmenter.from_workdir(args.workdir, which, batch_size=args.batch_size)
  stems = {}
  for start in range(0, len(files), 64):
    chunk = files[start:start + 64]
    for path, mask in zip(chunk, seg.predict(chunk)):
      stem = os.path.splitext(os.path.basename(path))[0]
      stems[stem] = stems.get(stem, 0) + 1
      name = stem if stems[stem] == 1 else f"{stem}_{stems[stem]}"
      save_mask_png(os.path.join(args.out, name + ".png"), mask)
  print(f"wrote {len(files)} masks to {args.out} (checkpoint step {seg.step})")
  return 0
