"""The GMS preprocessing and augmentation (docs/METHOD.md §3), with albumentations as the original.

The original (King-HAW/GMS ``data/image_dataset.py``, albumentations 1.x of early 2024) is::

    A.Compose([A.ToFloat(max_value=255.0), A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5),
               A.RandomRotate90(p=0.5),
               A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1, p=0.2),
               A.ShiftScaleRotate(shift_limit=0.15, scale_limit=0.1, rotate_limit=20, p=0.4),
               A.Resize(224, 224)])          # eval: ToFloat + Resize only

applied to ``image`` (RGB, float32) and ``mask`` (0/255). Masks follow every geometric transform
with nearest-neighbour interpolation; ColorJitter is image-only; ToFloat is image-only, so the
image is transformed as float32 in [0, 1] (we do the same, so there is no uint8 rounding between
steps) and the mask stays 0/255.

ShiftScaleRotate -> Affine (albumentations 2.0.8)
-------------------------------------------------
In 2.0.8 ``ShiftScaleRotate`` is a deprecated wrapper of ``Affine`` ("ShiftScaleRotate is a
special case of Affine transform. Please use Affine transform instead.") whose defaults *changed*
from 1.x: its border mode is now ``BORDER_CONSTANT`` (1.x: ``BORDER_REFLECT_101``) and it passes
``keep_ratio=False``, so x and y scale are drawn independently (1.x: one isotropic scale). We
therefore use ``Affine`` with the 1.x semantics spelled out:

    ShiftScaleRotate(shift_limit=0.15, scale_limit=0.1, rotate_limit=20, p=0.4)   # 1.x
    == Affine(translate_percent={"x": (-0.15, 0.15), "y": (-0.15, 0.15)},
              scale=(0.9, 1.1), keep_ratio=True, rotate=(-20, 20), shear=0,
              interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
              border_mode=cv2.BORDER_REFLECT_101, fit_output=False, p=0.4)

Remaining differences are albumentations' own: 2.x rounds the shift down to whole pixels and
rotates about the pixel-centre convention ``(w/2 - 0.5, h/2 - 0.5)`` (1.x: ``(w/2, h/2)``).

Randomness
----------
Each example is augmented from the ``np.random.Generator`` that grain's ``random_map`` hands us
(seeded from the pipeline seed and the element's index), so the pipeline is deterministic. We seed
the Compose with ``set_random_state(np_generator, random.Random(seed))``, which makes all
transforms draw *in sequence* from one stream, as in the original. ``Compose.set_random_seed(seed)``
/ ``Compose(seed=...)`` would be wrong here: in 2.0.8 it gives every transform its own
``random.Random(seed)`` with the same seed, so all transforms draw the same first number and
hflip, vflip and rot90 always fire together (tested in tests/test_data_augment.py).
A Compose holds that state, so each thread gets its own Compose.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import threading
from typing import Callable, Iterable

import cv2
import numpy as np

# albumentations checks PyPI for a newer version on import (up to 2 s, in every grain worker,
# and pointless offline); opt out unless the user asked for it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# albumentations' top-level import also pulls in its optional torch bridge (ToTensorV2) when
# torch is installed: ~2 s per process (every grain worker) for nothing we use. Hide it during
# our import only; `import albumentations.pytorch` still works afterwards.
_hide_torch_bridge = "albumentations" not in sys.modules and "torch" not in sys.modules
if _hide_torch_bridge:
  sys.modules["albumentations.pytorch"] = None  # type: ignore[assignment]
try:
  import albumentations as A  # noqa: E402
finally:
  if _hide_torch_bridge:
    del sys.modules["albumentations.pytorch"]

# The original probabilities and ranges (docs/METHOD.md §3).
HFLIP_P = 0.5
VFLIP_P = 0.5
ROT90_P = 0.5
COLOR_JITTER = dict(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1)
COLOR_JITTER_P = 0.2
SHIFT_LIMIT = 0.15
SCALE_LIMIT = 0.1
ROTATE_LIMIT = 20
SHIFT_SCALE_ROTATE_P = 0.4
BORDER_MODE = cv2.BORDER_REFLECT_101  # albumentations 1.x ShiftScaleRotate default

# Optional, NOT in METHOD §3 (fast recipe's ``bank.intensity_augment``, off by default): stronger
# brightness / contrast / gamma changes of the image only, for other scanners (BUS-BRA's images
# have ~0.73x BUSI's grey-level contrast). Fixed ranges; the bank manifest names them (v1).
INTENSITY_BRIGHTNESS = 0.3
INTENSITY_CONTRAST = 0.4
INTENSITY_BC_P = 0.8
INTENSITY_GAMMA = (70, 150)
INTENSITY_GAMMA_P = 0.5

# Optional, NOT in METHOD §3 (fast recipe's ``bank.scanner_augment``, off by default): image-only
# changes of the scanner's look, applied at the model's input size after the resize: blur or
# sharpening (probe/processing resolution), multiplicative speckle, a random tone (gain) curve,
# and additive noise. Aimed at BUS-BRA's failures (small lesions missed entirely). The bank
# manifest names them (v1).
SCANNER_BLUR_SIGMA = (0.3, 1.2)
SCANNER_SHARPEN_ALPHA = (0.1, 0.4)
SCANNER_BLUR_SHARPEN_P = 0.4
SCANNER_SPECKLE = (0.8, 1.2)  # elementwise multiplier, shared by the 3 channels
SCANNER_SPECKLE_P = 0.4
SCANNER_TONE_SCALE = 0.2
SCANNER_TONE_P = 0.4
SCANNER_NOISE_STD = (0.01, 0.05)  # of the [0, 1] range, shared by the 3 channels
SCANNER_NOISE_P = 0.2


def shift_scale_rotate(p: float = SHIFT_SCALE_ROTATE_P) -> A.Affine:
  """albumentations 1.x ``ShiftScaleRotate(0.15, 0.1, 20)`` expressed as a 2.x ``Affine``."""
  return A.Affine(
    translate_percent={"x": (-SHIFT_LIMIT, SHIFT_LIMIT), "y": (-SHIFT_LIMIT, SHIFT_LIMIT)},
    scale=(1.0 - SCALE_LIMIT, 1.0 + SCALE_LIMIT),
    keep_ratio=True,  # one isotropic scale, as 1.x ShiftScaleRotate
    rotate=(-ROTATE_LIMIT, ROTATE_LIMIT),
    shear=0.0,
    interpolation=cv2.INTER_LINEAR,
    mask_interpolation=cv2.INTER_NEAREST,
    border_mode=BORDER_MODE,
    fit_output=False,
    p=p,
  )


def intensity_transforms() -> list:
  """The optional image-only intensity changes (not docs/METHOD.md §3; see INTENSITY_*)."""
  return [
    A.RandomBrightnessContrast(
      brightness_limit=INTENSITY_BRIGHTNESS, contrast_limit=INTENSITY_CONTRAST, p=INTENSITY_BC_P
    ),
    A.RandomGamma(gamma_limit=INTENSITY_GAMMA, p=INTENSITY_GAMMA_P),
  ]


def scanner_transforms() -> list:
  """The optional image-only scanner-look changes (not docs/METHOD.md §3; see SCANNER_*)."""
  return [
    A.OneOf(
      [
        A.GaussianBlur(blur_limit=0, sigma_limit=SCANNER_BLUR_SIGMA),
        A.Sharpen(alpha=SCANNER_SHARPEN_ALPHA, lightness=(1.0, 1.0)),
      ],
      p=SCANNER_BLUR_SHARPEN_P,
    ),
    A.MultiplicativeNoise(
      multiplier=SCANNER_SPECKLE, per_channel=False, elementwise=True, p=SCANNER_SPECKLE_P
    ),
    A.RandomToneCurve(scale=SCANNER_TONE_SCALE, per_channel=False, p=SCANNER_TONE_P),
    A.GaussNoise(std_range=SCANNER_NOISE_STD, per_channel=False, p=SCANNER_NOISE_P),
  ]


@dataclasses.dataclass(frozen=True)
class Extra:
  """An optional image-only addition to the docs/METHOD.md §3 Compose (fast recipe only).

  ``after``: the METHOD §3 transform it follows; ``make``: its transforms; ``tag``: its name in a
  bank manifest's ``augmentation`` (bump the version when ``make`` changes what it draws).
  """

  after: str
  make: Callable[[], list]
  tag: str


# The optional extras, in the order they are applied and named (config ``bank.<name>_augment``).
EXTRAS: dict[str, Extra] = {
  "intensity": Extra(after="ColorJitter", make=intensity_transforms, tag="+intensity-v1"),
  "scanner": Extra(after="Resize", make=scanner_transforms, tag="+scanner-v1"),
}


def check_extras(extras: Iterable[str]) -> tuple[str, ...]:
  """``extras`` as a tuple in :data:`EXTRAS` order; ValueError (one line) for an unknown name."""
  names = set(extras)
  unknown = sorted(names - set(EXTRAS))
  if unknown:
    raise ValueError(
      f"unknown augmentation extra(s) {', '.join(map(repr, unknown))}; known: {', '.join(EXTRAS)}"
    )
  return tuple(name for name in EXTRAS if name in names)


def train_transform(image_size: int, extras: Iterable[str] = (), **compose_kwargs) -> A.Compose:
  """The GMS train-time Compose (input: float32 [0,1] RGB image and uint8 0/255 mask).

  ``extras`` (names in :data:`EXTRAS`, none by default) insert optional image-only transforms
  that are not METHOD §3: ``"intensity"`` (:func:`intensity_transforms`) after the colour jitter,
  ``"scanner"`` (:func:`scanner_transforms`) after the resize.
  """
  chosen = check_extras(extras)
  spec3 = [
    A.HorizontalFlip(p=HFLIP_P),
    A.VerticalFlip(p=VFLIP_P),
    A.RandomRotate90(p=ROT90_P),
    A.ColorJitter(**COLOR_JITTER, p=COLOR_JITTER_P),
    shift_scale_rotate(),
    A.Resize(image_size, image_size),  # image bilinear, mask nearest (albumentations defaults)
  ]
  transforms = []
  for t in spec3:
    transforms.append(t)
    for name in chosen:
      if EXTRAS[name].after == type(t).__name__:
        transforms.extend(EXTRAS[name].make())
  return A.Compose(transforms, **compose_kwargs)


def eval_transform(image_size: int) -> A.Compose:
  """Eval-time: resize only (image bilinear, mask nearest)."""
  return A.Compose([A.Resize(image_size, image_size)])


def seed_compose(compose: A.Compose, rng: np.random.Generator) -> None:
  """Make ``compose``'s next call a deterministic function of ``rng`` (one shared stream)."""
  seed = int(rng.integers(0, 2**63 - 1))
  compose.set_random_state(np.random.default_rng(seed), random.Random(seed))


def to_float01(image_uint8: np.ndarray) -> np.ndarray:
  return image_uint8.astype(np.float32) * np.float32(1.0 / 255.0)


class Augmenter:
  """Picklable, thread-safe ``(image uint8 (h,w,3), mask uint8 (h,w) {0,255}, rng) -> arrays``.

  Returns image float32 (S, S, 3) in [0, 1] and mask float32 (S, S) in {0, 1} (``num_classes``
  > 2: the mask is a uint8 label map and comes back as float32 class ids).
  """

  def __init__(
    self,
    image_size: int,
    augment: bool = True,
    extras: Iterable[str] = (),
    num_classes: int = 2,
  ):
    self.image_size = int(image_size)
    self.augment = bool(augment)
    self.extras = check_extras(extras)  # optional, not docs/METHOD.md §3 (see EXTRAS)
    self.num_classes = int(num_classes)  # > 2: masks are label maps (class ids), kept as ids
    self._local = threading.local()

  def __getstate__(self):
    return {
      "image_size": self.image_size,
      "augment": self.augment,
      "extras": self.extras,
      "num_classes": self.num_classes,
    }

  def __setstate__(self, state):
    self.__init__(
      state["image_size"], state["augment"], state.get("extras", ()), state.get("num_classes", 2)
    )

  def _compose(self) -> A.Compose:
    compose = getattr(self._local, "compose", None)
    if compose is None:
      if self.augment:
        compose = train_transform(self.image_size, extras=self.extras)
      else:
        compose = eval_transform(self.image_size)
      self._local.compose = compose
    return compose

  def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
    if mask.ndim == 3:
      mask = mask[..., 0]
    compose = self._compose()
    seed_compose(compose, rng)
    out = compose(image=to_float01(image), mask=mask)
    img = np.clip(out["image"], 0.0, 1.0).astype(np.float32, copy=False)
    if self.num_classes > 2:  # every geometric op moves masks nearest-neighbour: ids stay ids
      return img, out["mask"].astype(np.float32)
    m = (out["mask"] > 127).astype(np.float32)
    return img, m


def preprocess_image(image_uint8: np.ndarray, image_size: int) -> np.ndarray:
  """Eval transform of one RGB uint8 image -> float32 (S, S, 3) in [0, 1]."""
  img = np.asarray(image_uint8)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"expected a uint8 (h, w, 3) image, got {img.dtype} {img.shape}")
  out = cv2.resize(to_float01(img), (image_size, image_size), interpolation=cv2.INTER_LINEAR)
  return np.clip(out, 0.0, 1.0)


def resize_mask(mask: np.ndarray, image_size: int) -> np.ndarray:
  """Nearest-neighbour resize of a mask (any values) to (S, S), as albumentations' Resize."""
  return cv2.resize(mask, (image_size, image_size), interpolation=cv2.INTER_NEAREST)
