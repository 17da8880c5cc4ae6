"""evaluate.py / predict.py: the METHOD §4 protocol end to end, native-size outputs, file I/O."""

import csv
import json
import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from gms_jax import evaluate, predict, tokenizers
from gms_jax.convert import core
from gms_jax.models.latent_mapper import MapperConfig, ResAttnUNet_DS
from gms_jax.models.sd_vae import AutoencoderKL, AutoencoderKLConfig


def _random_flat(model, seed):
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in core.flat_shapes(nnx.state(model, nnx.Param)).items():
    if path.endswith("kernel"):
      flat[path] = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif path.endswith("scale"):
      flat[path] = 1.0 + 0.1 * rng.normal(size=shape)
    else:
      flat[path] = 0.1 * rng.normal(size=shape)
  return {k: v.astype(np.float32) for k, v in flat.items()}


@pytest.fixture(scope="module")
def segmenter():
  """A tiny random SD tokenizer (latent /2) + a narrow mapper, built abstractly (no init compile)."""
  vae = nnx.eval_shape(lambda: AutoencoderKL(AutoencoderKLConfig.tiny(), rngs=nnx.Rngs(0)))
  core.apply_flat(vae, _random_flat(vae, 0))
  tok = tokenizers.from_model("sd-vae", vae)
  mapper = nnx.eval_shape(
    lambda: ResAttnUNet_DS(MapperConfig(ch=16, gn_groups=8), rngs=nnx.Rngs(0))
  )
  core.apply_flat(mapper, _random_flat(mapper, 1))
  return predict.Segmenter(mapper, tok, image_size=32, batch_size=3, step=7)


class _Oracle:
  """Stands in for a Segmenter: returns each example's own ground truth as the probability map."""

  batch_size = 4
  step = 1

  def __init__(self, examples):
    self._by_image = {e["image"].tobytes(): e["mask"] for e in examples}

  def predict_probs(self, images):
    return np.stack([self._by_image[x.tobytes()] for x in images]).astype(np.float32)


def _examples(n=6, size=32, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    h, w = 40 + 3 * i, 50 - 2 * i
    native = np.zeros((h, w), np.uint8)
    if i != 0:  # example 0 has an empty mask
      y, x = rng.integers(5, 15, size=2)
      native[y : y + 15, x : x + 20] = 1
    mask = np.asarray(Image.fromarray(native).resize((size, size), Image.NEAREST)) >= 0.5
    out.append(
      {
        "image": rng.random((size, size, 3), dtype=np.float32),
        "mask": mask.astype(np.float32),
        "native_mask": native,
        "native_size": (h, w),
        "name": f"ex{i}",
      }
    )
  return out


def test_ground_truth_as_prediction_scores_perfectly(tmp_path):
  exs = _examples()
  summary = evaluate.evaluate(
    _Oracle(exs), iter(exs), str(tmp_path / "ev"), max_overlays=2, montage_n=5
  )
  with open(tmp_path / "ev" / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == [e["name"] for e in exs]
  nonempty = rows[1:]
  assert all(
    float(r["dsc"]) == 1.0 and float(r["iou"]) == 1.0 and float(r["hd95"]) == 0.0 for r in nonempty
  )
  # METHOD §4 zero-denominator rule: empty GT predicted empty -> DSC = IoU = 0; HD95 (both empty) 0.
  assert float(rows[0]["dsc"]) == 0.0 and float(rows[0]["hd95"]) == 0.0
  assert summary["n"] == 6
  assert summary["dsc"]["mean"] == pytest.approx(5 / 6)
  assert summary["dsc"]["std"] == pytest.approx(np.std([0, 1, 1, 1, 1, 1], ddof=1))
  assert json.load(open(tmp_path / "ev" / "summary.json"))["checkpoint_step"] == 1
  masks = sorted(os.listdir(tmp_path / "ev" / "masks"))
  assert masks == [f"ex{i}.png" for i in range(6)]
  m = np.asarray(Image.open(tmp_path / "ev" / "masks" / "ex3.png"))
  assert m.shape == (32, 32) and set(np.unique(m)) <= {0, 255}
  np.testing.assert_array_equal(m > 0, exs[3]["mask"] > 0)
  assert len(os.listdir(tmp_path / "ev" / "overlays")) == 2
  # 5 tiles of 32x32 in 4 columns -> 2 rows, 2-pixel white gaps; tile 3 is overlay(ex3).
  grid = np.asarray(Image.open(tmp_path / "ev" / "overlays_montage.png"))
  assert grid.shape == (2 * 32 + 2, 4 * 32 + 3 * 2, 3)
  pred3 = exs[3]["mask"] > 0.5
  np.testing.assert_array_equal(
    grid[0:32, 3 * 34 : 3 * 34 + 32],
    evaluate.overlay(exs[3]["image"], exs[3]["mask"] >= 0.5, pred3),
  )
  assert (grid[32:34] == 255).all() and (grid[34:, 34:] == 255).all()  # gap row, empty cells
  assert not os.path.exists(str(tmp_path / "ev") + ".tmp")


def test_inverted_prediction_scores_zero(tmp_path):
  exs = _examples(n=3)
  inv = [dict(e, mask=1.0 - e["mask"]) for e in exs]
  oracle = _Oracle(inv)
  summary = evaluate.evaluate(oracle, iter(exs), str(tmp_path / "ev"), max_overlays=0)
  assert summary["dsc"]["mean"] == 0.0 and summary["iou"]["mean"] == 0.0


def test_segmenter_predicts_native_sizes_for_any_mode(segmenter, tmp_path):
  rng = np.random.default_rng(0)
  files = []
  for name, mode, size in [
    ("grey.png", "L", (37, 29)),
    ("rgba.png", "RGBA", (64, 50)),
    ("rgb.jpg", "RGB", (31, 45)),
    ("pal.bmp", "RGB", (20, 20)),
  ]:
    arr = rng.integers(0, 255, size=(size[1], size[0], len(mode)), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode=mode).save(tmp_path / name)
    files.append(str(tmp_path / name))
  masks = segmenter.predict(files)
  sizes = [Image.open(f).size[::-1] for f in files]
  assert [m.shape for m in masks] == sizes
  assert all(m.dtype == bool for m in masks)
  # 4 inputs in batches of 3 (the last padded) give the same as one at a time.
  one_by_one = [segmenter.predict([f])[0] for f in files]
  for a, b in zip(masks, one_by_one):
    np.testing.assert_array_equal(a, b)


def test_resize_probs_and_collect_images(tmp_path):
  p = np.zeros((4, 4), np.float32)
  p[:, 2:] = 1.0
  r = predict.resize_probs(p, (8, 6))
  assert r.shape == (8, 6) and r[:, 0].max() < 0.5 and r[:, -1].min() > 0.5
  (tmp_path / "d" / "sub").mkdir(parents=True)
  for n in ["b.png", "a.JPG", "sub/c.tif", "notes.txt"]:
    (tmp_path / "d" / n).write_bytes(b"x")
  got = predict.collect_images([str(tmp_path / "d")])
  assert [os.path.relpath(g, tmp_path / "d") for g in got] == [
    "a.JPG",
    "b.png",
    os.path.join("sub", "c.tif"),
  ]
  with pytest.raises(FileNotFoundError, match="nope"):
    predict.collect_images([str(tmp_path / "nope")])


def test_predict_cli_reports_bad_inputs(tmp_path, capsys):
  from gms_jax import cli

  args = [
    "predict",
    "--workdir",
    str(tmp_path),
    str(tmp_path / "missing.png"),
    "--out",
    str(tmp_path / "o"),
  ]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert "missing.png" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- test-time augmentation
def test_dihedral_views_by_hand():
  from gms_jax import inference

  x = np.array([[1, 2], [3, 4]])[None]  # (1, 2, 2): rows (1 2), (3 4)
  rot = inference.dihedral(x, 1, False)[0]
  np.testing.assert_array_equal(rot, [[2, 4], [1, 3]])  # 90° counter-clockwise
  np.testing.assert_array_equal(inference.dihedral(x, 0, True)[0], [[2, 1], [4, 3]])  # left-right
  np.testing.assert_array_equal(
    inference.dihedral(x, 1, True)[0], [[4, 2], [3, 1]]
  )  # rotate, then flip
  img = np.arange(2 * 5 * 5 * 3).reshape(2, 5, 5, 3)  # no symmetry: the 8 views are 8 arrays
  views = inference.TTA_VIEWS["d4"]
  assert len({inference.dihedral(img, k, f).tobytes() for k, f in views}) == 8
  for k, f in views:
    np.testing.assert_array_equal(inference.undo_dihedral(inference.dihedral(img, k, f), k, f), img)
  assert tuple(inference.TTA_VIEWS) == predict.TTA_CHOICES


def test_tta_averages_views_mapped_back():
  """A position-dependent stand-in model: p(x) = x[..., 0] * ramp over columns."""
  from gms_jax import inference

  rng = np.random.default_rng(0)
  x = rng.random((3, 6, 6, 3)).astype(np.float32)
  ramp = np.linspace(0, 1, 6, dtype=np.float32)
  fn = lambda imgs: imgs[..., 0] * ramp  # noqa: E731
  np.testing.assert_allclose(inference.tta_probs(fn, x, "none"), x[..., 0] * ramp, rtol=0, atol=0)
  # flip view: the flipped image's column j holds column 5-j, weighted ramp[j]; mapped back -> ramp[5-j]
  np.testing.assert_allclose(
    inference.tta_probs(fn, x, "flip"), x[..., 0] * (ramp + ramp[::-1]) / 2, rtol=0, atol=1e-7
  )
  # d4: every pixel sees the column weight of each of its 8 images, i.e. ramp[i], ramp[5-i], ramp[j], ramp[5-j], twice
  i, j = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
  w = (ramp[i] + ramp[5 - i] + ramp[j] + ramp[5 - j]) / 4
  np.testing.assert_allclose(inference.tta_probs(fn, x, "d4"), x[..., 0] * w, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="unknown test-time augmentation 'bogus'"):
    inference.tta_probs(fn, x, "bogus")


def test_segmenter_tta_is_equivariant(segmenter):
  """With all of D4 the averaged prediction of a flipped/rotated image is the flipped/rotated
  prediction; the random mapper alone is not (so the test can fail)."""
  rng = np.random.default_rng(3)
  x = rng.random((4, 32, 32, 3)).astype(np.float32)
  plain = segmenter.predict_probs(x)
  flipped = lambda a: np.ascontiguousarray(a[:, :, ::-1])  # noqa: E731
  rotated = lambda a: np.ascontiguousarray(np.rot90(a, 1, axes=(1, 2)))  # noqa: E731
  assert np.abs(segmenter.predict_probs(flipped(x)) - flipped(plain)).max() > 1e-3
  seg_flip = _with_tta(segmenter, "flip")
  seg_d4 = _with_tta(segmenter, "d4")
  p_flip = seg_flip.predict_probs(x)
  np.testing.assert_allclose(
    p_flip, (plain + flipped(segmenter.predict_probs(flipped(x)))) / 2, atol=1e-6
  )
  np.testing.assert_allclose(seg_flip.predict_probs(flipped(x)), flipped(p_flip), atol=1e-6)
  p_d4 = seg_d4.predict_probs(x)
  np.testing.assert_allclose(seg_d4.predict_probs(flipped(x)), flipped(p_d4), atol=1e-6)
  np.testing.assert_allclose(seg_d4.predict_probs(rotated(x)), rotated(p_d4), atol=1e-6)
  assert p_d4.shape == (4, 32, 32) and 0 <= p_d4.min() and p_d4.max() <= 1
  with pytest.raises(ValueError, match="unknown test-time augmentation"):
    _with_tta(segmenter, "rot")


def _with_tta(seg, tta):
  mapper = nnx.merge(seg._graphdef, seg._params)
  return predict.Segmenter(
    mapper, seg.tokenizer, image_size=seg.image_size, batch_size=seg.batch_size, tta=tta
  )


# ----------------------------------------------------------------------------- CPU library fusion
def test_segmenter_cpu_library_fusion_compiles_otherwise_and_keeps_the_probabilities(segmenter):
  """cpu_library_fusion reaches the inference jit (another count of YNNPACK library fusions in the
  optimized HLO) and changes the probabilities by float32 rounding only; unknown names are refused
  in one line that names the flag."""
  mapper = nnx.merge(segmenter._graphdef, segmenter._params)
  fused = predict.Segmenter(
    mapper, segmenter.tokenizer, image_size=32, batch_size=3, cpu_library_fusion=" DOT, reduce"
  )
  assert fused.cpu_library_fusion == "dot,reduce" and segmenter.cpu_library_fusion == ""
  x = np.random.default_rng(5).random((4, 32, 32, 3)).astype(np.float32)

  def count(seg):
    lowered = seg._probs.lower(seg._params, seg.tokenizer.params, x[:3])
    return lowered.compile().as_text().count('"__ynn_fusion"')

  assert count(fused) != count(segmenter)
  np.testing.assert_allclose(fused.predict_probs(x), segmenter.predict_probs(x), rtol=0, atol=1e-4)
  from gms_jax import errors

  with pytest.raises(errors.UsageError, match="--cpu-library-fusion") as e:
    predict.parse_fusion("dot,conv")
  assert "'conv'" in str(e.value) and "\n" not in str(e.value)
  # From a config or the Python API (not the flag): the one-line error names the config key.
  with pytest.raises(errors.ConfigError, match=r"^config\.cpu_library_fusion: unknown 'conv'") as e:
    predict.Segmenter(mapper, segmenter.tokenizer, image_size=32, cpu_library_fusion="dot,conv")
  assert "--cpu-library-fusion" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_cli_refuses_an_unknown_cpu_library_fusion_before_any_work(tmp_path, capsys, command):
  from gms_jax import cli

  image = tmp_path / "x.png"
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
  out = tmp_path / "o"
  args = [
    command,
    "--workdir",
    str(tmp_path / "nowhere"),
    "--out",
    str(out),
    "--cpu-library-fusion",
    "dot,conv",
  ]
  assert cli.main(args + ([str(image)] if command == "predict" else [])) == 2
  err = capsys.readouterr().err
  assert "--cpu-library-fusion" in err and "'conv'" in err and len(err.strip().splitlines()) == 1
  assert not out.exists()
