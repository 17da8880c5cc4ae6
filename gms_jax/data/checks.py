"""Reading and validating image/mask folders in the GMS layout; ``gms-jax check-data PATH``.

Layout: ``ROOT/images/<stem>.<ext>`` and ``ROOT/masks/<stem>.<ext>``, ext one of
:data:`IMAGE_EXTENSIONS` (case-insensitive). Hidden files are skipped; other files are reported as
warnings and ignored.

Every problem becomes one :class:`DataError` whose message starts with the offending file:

* image or mask that cannot be decoded (corrupt, truncated, not an image);
* an image without a mask, a mask without an image, two files with the same stem;
* image and mask of different sizes;
* a mask that is not binary 0/255: 0/1 masks, 16-bit masks, colour (RGB with differing channels)
  masks, grey levels. Masks stored as RGB/RGBA/palette whose colour channels are equal are accepted
  (the original GMS reads masks as RGB), as are 1-bit masks;
* split problems (see :mod:`gms_jax.data.splits`).

Images of any mode become RGB uint8 the way the original does (``PIL.Image.convert("RGB")``: grey
is replicated, alpha is dropped, palettes are expanded), except 16-bit greyscale, which PIL would
clip; it is scaled to 8 bit (``round(v * 255 / 65535)``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from gms_jax.data.formats import IMAGE_EXTENSIONS
from gms_jax.errors import DataError  # re-exported: gms_jax.data.checks.DataError

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# --------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------


def _open(path: str | os.PathLike, what: str) -> Image.Image:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: {what} file does not exist")
  try:
    img = Image.open(path)
    img.load()  # decodes fully: truncated / corrupt data fails here, not later
    # One orientation rule for every reader (training, evaluation, prediction): the displayed
    # one. A JPEG/TIFF/WebP whose EXIF orientation tag says "rotate" is rotated as viewers show
    # it; masks are predicted and read in that orientation too.
    img = ImageOps.exif_transpose(img)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
    raise DataError(f"{path}: cannot decode {what} ({type(e).__name__}: {e})") from None
  if img.width == 0 or img.height == 0:
    raise DataError(f"{path}: {what} has zero size")
  return img


def image_to_rgb(img: Image.Image, path: str = "<image>") -> tuple[np.ndarray, bool]:
  """PIL image -> (uint8 (h, w, 3) RGB array, whether all channels are equal)."""
  mode = img.mode
  if mode in _SIXTEEN_BIT_MODES:
    arr = np.asarray(img)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
      raise DataError(f"{path}: {mode} image has values outside 0..65535")
    grey = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), True
  if mode == "F":
    raise DataError(f"{path}: floating-point images (mode F) are not supported; save as 8-bit")
  if mode == "L":
    grey = np.asarray(img)
    return np.repeat(grey[..., None], 3, axis=-1), True
  if mode != "RGB":
    try:
      img = img.convert("RGB")
    except Exception as e:
      raise DataError(f"{path}: cannot convert image mode {mode} to RGB ({e})") from None
  arr = np.asarray(img)
  is_grey = bool(
    np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
  )
  return arr, is_grey


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Any supported image file -> uint8 (h, w, 3) RGB; DataError naming the file otherwise."""
  return image_to_rgb(_open(path, "image"), os.fspath(path))[0]


def read_image_with_grey_flag(path: str | os.PathLike) -> tuple[np.ndarray, bool]:
  return image_to_rgb(_open(path, "image"), os.fspath(path))


def mask_to_binary(img: Image.Image, path: str = "<mask>") -> np.ndarray:
  """PIL mask -> uint8 (h, w) with values in {0, 255}; DataError for anything else."""
  mode = img.mode
  if mode == "1":
    return np.asarray(img).astype(np.uint8) * 255
  if mode in _SIXTEEN_BIT_MODES or mode == "F":
    arr = np.asarray(img)
    vals = np.unique(arr)
    raise DataError(
      f"{path}: mask is {'16/32-bit' if mode != 'F' else 'floating-point'} (mode {mode}, "
      f"values {_values_preview(vals)}); expected an 8-bit mask with values 0 and 255"
    )
  if mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    mode = img.mode
  if mode == "L":
    grey = np.asarray(img)
  elif mode in ("LA", "RGB", "RGBA"):
    arr = np.asarray(img)
    if mode in ("LA", "RGBA"):
      arr = arr[..., :-1]  # alpha is ignored, as PIL's convert("RGB") does
    grey = arr[..., 0]
    for c in range(1, arr.shape[-1]):
      if not np.array_equal(arr[..., c], grey):
        raise DataError(
          f"{path}: colour mask (mode {mode}: the colour channels differ); expected a "
          "single-channel binary mask with values 0 and 255"
        )
  else:
    raise DataError(f"{path}: unsupported mask mode {mode}; expected an 8-bit 0/255 mask")
  counts = np.bincount(grey.ravel(), minlength=256)
  vals = np.flatnonzero(counts)
  if set(vals.tolist()) <= {0, 255}:
    return np.ascontiguousarray(grey, dtype=np.uint8)
  if set(vals.tolist()) <= {0, 1}:
    raise DataError(f"{path}: mask values are 0/1; expected 0/255 (multiply the mask by 255)")
  raise DataError(
    f"{path}: mask has values other than 0 and 255 ({len(vals)} distinct: "
    f"{_values_preview(vals)}); binarise it (e.g. value > 127 -> 255)"
  )


def _values_preview(vals: np.ndarray, k: int = 6) -> str:
  vals = [int(v) for v in np.asarray(vals).ravel()[: k + 1]]
  return ", ".join(map(str, vals[:k])) + (", ..." if len(vals) > k else "")


def mask_to_labels(img: Image.Image, num_classes: int, path: str = "<mask>") -> np.ndarray:
  """PIL label map -> uint8 (h, w) of class ids in [0, num_classes); DataError for anything else
  (values outside the ids, a 0/255 binary mask, colour). 8- or 16-bit single channel, palette
  (the indices are the ids, as nnU-Net's tools write them) or RGB with equal channels."""
  mode = img.mode
  if mode == "1":
    arr = np.asarray(img).astype(np.uint8)
  elif mode == "P":
    arr = np.asarray(img)  # palette indices
  elif mode in _SIXTEEN_BIT_MODES or mode == "L":
    arr = np.asarray(img)
  elif mode in ("LA", "RGB", "RGBA"):
    full = np.asarray(img)
    if mode in ("LA", "RGBA"):
      full = full[..., :-1]
    arr = full[..., 0]
    for c in range(1, full.shape[-1]):
      if not np.array_equal(full[..., c], arr):
        raise DataError(
          f"{path}: colour label map (mode {mode}: the colour channels differ); expected one "
          f"channel of class ids 0..{num_classes - 1} (dataset.json labels)"
        )
  else:
    raise DataError(
      f"{path}: unsupported label map mode {mode}; expected 8-bit class ids 0..{num_classes - 1}"
    )
  vals = np.unique(arr)
  bad = vals[(vals < 0) | (vals >= num_classes)]
  if bad.size:
    if set(vals.tolist()) <= {0, 255}:
      raise DataError(
        f"{path}: a binary 0/255 mask, but dataset.json declares label ids "
        f"0..{num_classes - 1}; write the class id of each pixel instead of 255"
      )
    raise DataError(
      f"{path}: label values {_values_preview(bad)} outside the declared ids "
      f"0..{num_classes - 1} (dataset.json labels)"
    )
  return np.ascontiguousarray(arr, dtype=np.uint8)


def read_mask(path: str | os.PathLike, num_classes: int | None = None) -> np.ndarray:
  """A mask file -> uint8 (h, w) in {0, 255} (``num_classes`` None: a binary folder), or the
  class ids of a label-map folder (C > 2; C = 2 label maps come back as 0/255 masks); DataError
  naming the file otherwise."""
  if num_classes is None:
    return mask_to_binary(_open(path, "mask"), os.fspath(path))
  if int(num_classes) == 2:  # a two-label declaration: 0/1 label maps or 0/255 masks
    ids = mask_to_labels(_open(path, "mask"), 256, os.fspath(path))
    vals = set(np.unique(ids).tolist())
    if vals <= {0, 255}:
      return ids
    if vals <= {0, 1}:
      return ids * np.uint8(255)
    raise DataError(
      f"{os.fspath(path)}: mask values {_values_preview(np.array(sorted(vals)))}; dataset.json "
      "declares two labels: expected 0/1 (or 0/255)"
    )
  return mask_to_labels(_open(path, "label map"), int(num_classes), os.fspath(path))


def read_pair(
  image_path, mask_path, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray, bool]:
  """Read and validate one pair: (RGB uint8 image, mask (:func:`read_mask`), image-is-grey)."""
  image, grey = read_image_with_grey_flag(image_path)
  mask = read_mask(mask_path, num_classes)
  if image.shape[:2] != mask.shape[:2]:
    (ih, iw), (mh, mw) = image.shape[:2], mask.shape[:2]
    raise DataError(
      f"{os.fspath(mask_path)}: mask is {mw}x{mh} (WxH) but its image "
      f"{os.fspath(image_path)} is {iw}x{ih}"
    )
  return image, mask, grey


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pair:
  stem: str
  image: str  # path
  mask: str  # path


@dataclasses.dataclass
class FolderScan:
  root: str
  pairs: list[Pair]
  problems: list[str]  # each "PATH: problem"
  warnings: list[str]
  class_names: tuple[str, ...] | None = None  # dataset.json labels (None: a binary folder)
  class_cases: list[int] | None = None  # per class id: masks holding it (decoded label maps)
  class_pixels: list[int] | None = None  # per class id: pixels


def _list_dir(d: Path, what: str, problems: list[str], warnings: list[str]) -> dict[str, str]:
  by_stem: dict[str, list[str]] = {}
  for entry in sorted(os.scandir(d), key=lambda e: e.name):
    if entry.name.startswith("."):
      continue
    if not entry.is_file():
      warnings.append(f"{entry.path}: ignored (not a file)")
      continue
    stem, ext = os.path.splitext(entry.name)
    if ext.lower() not in IMAGE_EXTENSIONS:
      warnings.append(f"{entry.path}: ignored (not an image format Pillow reads)")
      continue
    by_stem.setdefault(stem, []).append(entry.path)
  out = {}
  for stem, paths in by_stem.items():
    if len(paths) > 1:
      problems.append(
        f"{paths[0]}: several {what} files share the stem '{stem}': "
        + ", ".join(os.path.basename(p) for p in paths)
      )
    else:
      out[stem] = paths[0]
  return out


def scan_folder(root: str | os.PathLike) -> FolderScan:
  """Pair up ``images/`` and ``masks/`` by stem (no decoding). Structural problems are listed."""
  root_p = Path(root)
  problems: list[str] = []
  warnings: list[str] = []
  if not root_p.is_dir():
    raise DataError(f"{root_p}: dataset folder does not exist")
  dirs = {}
  for sub in ("images", "masks"):
    d = root_p / sub
    if not d.is_dir():
      problems.append(f"{d}: missing '{sub}/' folder (expected the GMS layout images/, masks/)")
      dirs[sub] = {}
    else:
      dirs[sub] = _list_dir(d, sub[:-1], problems, warnings)
  images, masks = dirs["images"], dirs["masks"]
  for stem in sorted(set(images) - set(masks)):
    problems.append(f"{images[stem]}: image has no mask (expected masks/{stem}.png or similar)")
  for stem in sorted(set(masks) - set(images)):
    problems.append(f"{masks[stem]}: mask has no image (expected images/{stem}.png or similar)")
  pairs = [Pair(s, images[s], masks[s]) for s in sorted(set(images) & set(masks))]
  if not pairs and (root_p / "images").is_dir() and (root_p / "masks").is_dir():
    problems.append(f"{root_p}: no image/mask pairs found")
  return FolderScan(os.fspath(root_p), pairs, problems, warnings)


def check_folder(
  root: str | os.PathLike,
  *,
  dataset: str = "folder",
  split_file: str | None = None,
  test_fraction: float = 0.2,
  val_fraction: float = 0.1,
  seed: int = 2333,
  decode: bool = True,
) -> tuple[FolderScan, str | None]:
  """Scan, decode and validate every pair and the split; returns (scan, split description).

  ``scan.problems`` then holds every problem found (it does not stop at the first).
  """
  from gms_jax.data import labels as labels_lib
  from gms_jax.data import splits as splits_lib

  scan = scan_folder(root)
  try:
    names = labels_lib.read_labels(root)
  except DataError as e:
    scan.problems.append(str(e))
    names = None
  scan.class_names = names
  if names is not None:
    scan.class_cases = [0] * len(names)
    scan.class_pixels = [0] * len(names)
  if decode:
    for pair in scan.pairs:
      try:
        _, mask, _ = read_pair(pair.image, pair.mask, len(names) if names else None)
      except DataError as e:
        scan.problems.append(str(e))
        continue
      if names is not None:
        ids = mask // 255 if len(names) == 2 else mask
        counts = np.bincount(ids.ravel(), minlength=len(names))
        for c, k in enumerate(counts.tolist()):
          scan.class_pixels[c] += k
          scan.class_cases[c] += int(k > 0)
  desc = None
  if not split_file:
    split_file = splits_lib.default_split_file(dataset, root)
  if scan.pairs:
    try:
      desc = splits_lib.resolve_splits(
        [p.stem for p in scan.pairs],
        dataset=dataset,
        split_file=split_file,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
      ).describe()
    except DataError as e:
      scan.problems.append(str(e))
  return scan, desc
