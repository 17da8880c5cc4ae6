"""The GMS augmentation: probabilities and ranges, image/mask alignment, determinism."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage

from gms_jax.data import augment


def _shape_image(h=150, w=200):
  """Asymmetric white shapes on black: the mask is exactly 'image is bright'."""
  mask = np.zeros((h, w), np.uint8)
  mask[20:110, 30:60] = 255  # vertical bar of an "L"
  mask[90:110, 30:140] = 255  # its foot
  mask[15:35, 150:185] = 255  # a square near the top-right corner
  image = np.repeat(mask[..., None], 3, axis=-1)
  return image, mask


def test_affine_reproduces_old_shift_scale_rotate():
  compose = augment.train_transform(224)
  names = [type(t).__name__ for t in compose.transforms]
  assert names == [
    "HorizontalFlip",
    "VerticalFlip",
    "RandomRotate90",
    "ColorJitter",
    "Affine",
    "Resize",
  ]
  affine = compose.transforms[4]
  assert affine.p == 0.4 and affine.keep_ratio
  assert affine.scale == {"x": (0.9, 1.1), "y": (0.9, 1.1)}
  assert affine.translate_percent == {"x": (-0.15, 0.15), "y": (-0.15, 0.15)}
  assert affine.rotate == (-20.0, 20.0)
  assert affine.border_mode == cv2.BORDER_REFLECT_101
  assert affine.interpolation == cv2.INTER_LINEAR
  assert affine.mask_interpolation == cv2.INTER_NEAREST
  jitter = compose.transforms[3]
  assert jitter.p == 0.2
  assert jitter.brightness == (0.9, 1.1) and jitter.contrast == (0.9, 1.1)
  assert jitter.saturation == (0.9, 1.1) and jitter.hue == (-0.1, 0.1)
  assert [t.p for t in compose.transforms[:3]] == [0.5, 0.5, 0.5]
  resize = compose.transforms[5]
  assert (resize.height, resize.width, resize.interpolation) == (224, 224, cv2.INTER_LINEAR)


def test_transform_probabilities_and_independence():
  """Each transform fires with its own probability, independently of the others."""
  compose = augment.train_transform(16, save_applied_params=True)
  image = np.zeros((16, 16, 3), np.float32)
  mask = np.zeros((16, 16), np.uint8)
  n = 400
  fired = {
    k: np.zeros(n, bool)
    for k in ("HorizontalFlip", "VerticalFlip", "RandomRotate90", "ColorJitter", "Affine")
  }
  for i in range(n):
    augment.seed_compose(compose, np.random.default_rng(i))
    applied = {name for name, _ in compose(image=image, mask=mask)["applied_transforms"]}
    for k in fired:
      fired[k][i] = k in applied
  expected = {
    "HorizontalFlip": 0.5,
    "VerticalFlip": 0.5,
    "RandomRotate90": 0.5,
    "ColorJitter": 0.2,
    "Affine": 0.4,
  }
  for k, p in expected.items():
    assert abs(fired[k].mean() - p) < 0.08, (k, fired[k].mean())
  # independent draws (Compose.set_random_seed would make these agree 100 % of the time)
  agree = (fired["HorizontalFlip"] == fired["VerticalFlip"]).mean()
  assert 0.4 < agree < 0.6, agree
  agree = (fired["HorizontalFlip"] == fired["RandomRotate90"]).mean()
  assert 0.4 < agree < 0.6, agree


def test_image_and_mask_stay_aligned():
  image, mask = _shape_image()
  aug = augment.Augmenter(96, augment=True)
  plain = augment.resize_mask(mask, 96) > 127
  changed = 0
  for seed in range(40):
    img, m = aug(image, mask, np.random.default_rng(seed))
    assert img.shape == (96, 96, 3) and img.dtype == np.float32
    assert m.shape == (96, 96) and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    assert 0.0 <= img.min() and img.max() <= 1.0
    from_image = img.mean(-1) > 0.5
    mb = m > 0.5
    band = ndimage.binary_dilation(mb, iterations=2) & ~ndimage.binary_erosion(mb, iterations=2)
    wrong = from_image != mb
    assert not (wrong & ~band).any(), f"seed {seed}: misaligned pixels away from the edges"
    assert wrong.mean() < 0.05, (seed, wrong.mean())
    changed += not np.array_equal(mb, plain)
  assert changed > 25  # the transforms did move things around


def test_deterministic_per_rng():
  image, mask = _shape_image()
  aug = augment.Augmenter(64)
  a = aug(image, mask, np.random.default_rng(123))
  b = augment.Augmenter(64)(image, mask, np.random.default_rng(123))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  outs = {aug(image, mask, np.random.default_rng(s))[1].tobytes() for s in range(12)}
  assert len(outs) > 6


def test_eval_transform_and_preprocess_agree():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
  ref = augment.eval_transform(32)(image=augment.to_float01(img))["image"]
  out = augment.preprocess_image(img, 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, ref, atol=1e-6)
  noaug = augment.Augmenter(32, augment=False)
  mask = (rng.random((37, 53)) > 0.5).astype(np.uint8) * 255
  i2, m2 = noaug(img, mask, np.random.default_rng(0))
  np.testing.assert_allclose(i2, ref, atol=1e-6)
  np.testing.assert_array_equal(m2, augment.resize_mask(mask, 32) / 255.0)
  with pytest.raises(ValueError, match="uint8"):
    augment.preprocess_image(img.astype(np.float32), 32)


def test_intensity_option_adds_image_only_changes_and_leaves_spec_default():
  """``extras=("intensity",)`` (fast recipe's bank.intensity_augment, not docs/METHOD.md §3)
  inserts brightness / contrast and gamma after the colour jitter; the default Compose is the
  METHOD §3 list above."""
  names = [type(t).__name__ for t in augment.train_transform(32, extras=("intensity",)).transforms]
  assert names == [
    "HorizontalFlip",
    "VerticalFlip",
    "RandomRotate90",
    "ColorJitter",
    "RandomBrightnessContrast",
    "RandomGamma",
    "Affine",
    "Resize",
  ]
  assert len(augment.train_transform(32).transforms) == 6
  # masks stay aligned with the image under the extra transforms (same check as above)
  image, mask = _shape_image()
  aug = augment.Augmenter(96, extras=("intensity",))
  for seed in range(20):
    img, m = aug(image, mask, np.random.default_rng(seed))
    assert set(np.unique(m)) <= {0.0, 1.0} and 0.0 <= img.min() and img.max() <= 1.0
    mb = m > 0.5
    band = ndimage.binary_dilation(mb, iterations=2) & ~ndimage.binary_erosion(mb, iterations=2)
    assert not (((img.mean(-1) > img.mean()) != mb) & ~band).any(), seed
  # on a mid-grey image the grey level varies far more (contrast +-0.4, brightness +-0.3 at
  # p 0.8, gamma at p 0.5) than with docs/METHOD.md §3 alone (jitter 0.1 at p 0.2)
  grey = np.full((40, 40, 3), 128, np.uint8)
  ramp = np.tile(np.linspace(0, 255, 40, dtype=np.uint8)[:, None, None], (1, 40, 3))
  flat = np.zeros((40, 40), np.uint8)
  plain, strong = augment.Augmenter(40), augment.Augmenter(40, extras=("intensity",))
  spread = {}
  for name, a in (("plain", plain), ("strong", strong)):
    means = [a(grey, flat, np.random.default_rng(s))[0].mean() for s in range(200)]
    stds = [a(ramp, flat, np.random.default_rng(s))[0].std() for s in range(200)]
    spread[name] = (np.std(means), np.std(stds))
  assert spread["strong"][0] > 2 * spread["plain"][0], spread
  assert spread["strong"][1] > 2 * spread["plain"][1], spread
  # picklable with the option (grain workers)
  import pickle

  assert pickle.loads(pickle.dumps(strong)).extras == ("intensity",)


def test_scanner_option_changes_the_look_only_after_the_resize():
  """``extras=("scanner",)`` (fast recipe's bank.scanner_augment, not docs/METHOD.md §3) appends
  blur/sharpen, speckle, tone curve and noise after the resize: the geometry (hence the mask) of a
  view is the one drawn without it from the same generator, grey images stay grey, values stay in
  [0, 1], and a flat image gets texture (speckle / noise) that METHOD §3 never adds."""
  names = [
    type(t).__name__
    for t in augment.train_transform(32, extras=("scanner", "intensity")).transforms
  ]
  assert names == [
    "HorizontalFlip",
    "VerticalFlip",
    "RandomRotate90",
    "ColorJitter",
    "RandomBrightnessContrast",
    "RandomGamma",
    "Affine",
    "Resize",
    "OneOf",
    "MultiplicativeNoise",
    "RandomToneCurve",
    "GaussNoise",
  ]
  image, mask = _shape_image()
  grey_shape = np.repeat(image.mean(-1, keepdims=True).astype(np.uint8), 3, axis=-1)
  with_s, without = (
    augment.Augmenter(96, extras=("intensity", "scanner")),
    augment.Augmenter(96, extras=("intensity",)),
  )
  changed = 0
  for seed in range(30):
    img, m = with_s(grey_shape, mask, np.random.default_rng(seed))
    ref, m_ref = without(grey_shape, mask, np.random.default_rng(seed))
    np.testing.assert_array_equal(m, m_ref)
    assert img.dtype == np.float32 and 0.0 <= img.min() and img.max() <= 1.0
    np.testing.assert_array_equal(img[..., 0], img[..., 1])
    np.testing.assert_array_equal(img[..., 0], img[..., 2])
    changed += not np.allclose(img, ref, atol=1e-6)
  assert changed >= 15, changed  # 1 - 0.6 * 0.6 * 0.6 * 0.8 = 83 % of views change
  # texture on a flat mid-grey image: none with METHOD §3 alone, often with the scanner option
  grey = np.full((40, 40, 3), 128, np.uint8)
  flat = np.zeros((40, 40), np.uint8)
  plain, scan = augment.Augmenter(40), augment.Augmenter(40, extras=("scanner",))
  tex_plain = [plain(grey, flat, np.random.default_rng(s))[0].std() for s in range(100)]
  tex_scan = [scan(grey, flat, np.random.default_rng(s))[0].std() for s in range(100)]
  assert max(tex_plain) < 1e-3, max(tex_plain)
  assert np.mean(np.array(tex_scan) > 0.01) > 0.3, np.mean(np.array(tex_scan) > 0.01)
  import pickle

  assert pickle.loads(pickle.dumps(scan)).extras == ("scanner",)


def test_extras_are_named_checked_and_ordered():
  """Extras are applied (and named in a bank manifest) in one fixed order whatever order they
  are given in; an unknown name is a one-line error naming it; none gives the METHOD §3 Compose."""
  assert augment.check_extras(["scanner", "intensity", "scanner"]) == ("intensity", "scanner")
  assert augment.check_extras(()) == ()
  with pytest.raises(ValueError, match="'blur'") as e:
    augment.Augmenter(32, extras=("intensity", "blur"))
  assert "\n" not in str(e.value)
  spec = [type(t).__name__ for t in augment.train_transform(32).transforms]
  assert spec == [
    "HorizontalFlip",
    "VerticalFlip",
    "RandomRotate90",
    "ColorJitter",
    "Affine",
    "Resize",
  ]
