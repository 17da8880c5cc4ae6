"""Multi-class segmentation (docs/METHOD.md §7): labels, codings, loss, metrics, hostile label
maps, and smoke-sized runs of both recipes on synthetic images holding several classes."""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _multiclass_data import LABELS, make_dataset
from _train_helpers import tiny_tokenizer
from conftest import run_cli
from flax import nnx
from PIL import Image

from gms_jax import classes as classes_lib
from gms_jax import loss as loss_lib
from gms_jax import metrics
from gms_jax.data import checks, labels
from gms_jax.errors import DataError
from gms_jax.models.latent_mapper import MapperConfig, ResAttnUNet_DS

# ----------------------------------------------------------------------------- classes


def test_channels_label_rule_hand_cases():
  c = classes_lib.Classes(3)
  scores = np.array([[[0.6, 0.7], [0.4, 0.3], [0.9, 0.2], [0.51, 0.5]]], np.float32)  # (1,4,2)
  np.testing.assert_array_equal(c.labels(scores), [[2, 0, 1, 1]])
  binary = classes_lib.Classes(2)
  np.testing.assert_array_equal(binary.labels(np.array([0.5, 0.51, 0.1])), [0, 1, 0])


def test_palette_coding_decodes_its_own_colours():
  """The palette image of a label map, taken as the decoder's output, gives the labels back."""
  c = classes_lib.Classes(5, "palette")
  lab = np.random.default_rng(0).integers(0, 5, size=(2, 6, 6)).astype(np.float32)
  (rgb,) = c.mask_images(jnp.asarray(lab))
  np.testing.assert_array_equal(c.labels(np.asarray(c.scores([rgb]))), lab.astype(np.uint8))
  # class 1 is white and the background black: C = 2 painted is the binary mask
  (rgb2,) = classes_lib.Classes(3, "palette").mask_images(jnp.asarray([[0.0, 1.0]]))
  np.testing.assert_array_equal(np.asarray(rgb2), [[[0, 0, 0], [1, 1, 1]]])


def test_mapper_out_channels():
  assert classes_lib.Classes(2).mask_latent_channels(32) == 32
  assert classes_lib.Classes(4).mask_latent_channels(32) == 96
  assert classes_lib.Classes(4, "palette").mask_latent_channels(32) == 32
  assert classes_lib.Classes(2, "palette").effective_coding == "channels"


# ----------------------------------------------------------------------------- loss


def _np_dice(p, g):
  axes = tuple(range(1, p.ndim))
  inter, den = (p * g).sum(axes), p.sum(axes) + g.sum(axes)
  return float(np.mean(1.0 - (2.0 * inter + 1e-5) / (den + 1e-5)))


@pytest.mark.parametrize("batch", [(True, True)])  # one decoder call: the interleaved order
def test_multiclass_loss_against_per_class_reference(batch):
  """The class-channel loss equals the mean over classes of the binary loss terms, computed here
  class by class with separate encoder/decoder calls (no interleave, no concatenation)."""
  tok = tiny_tokenizer(0)
  L = tok.latent_channels
  cls = classes_lib.Classes(3)
  mcfg = MapperConfig(in_channels=L, out_channels=2 * L, ch=16)
  mapper = ResAttnUNet_DS(mcfg, rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(mapper, nnx.Param)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  lab = rng.integers(0, 3, size=(2, 16, 16)).astype(np.float32)
  heads = ("level1", "out")
  got, terms = loss_lib.gms_loss(
    graphdef,
    params,
    tok,
    tok.params,
    images,
    lab,
    apply_noise=False,
    eps=None,
    heads=heads,
    batch_decode=batch[0],
    batch_encode=batch[1],
    classes=cls,
  )
  z_img = np.asarray(tok.encode(tok.params, images).z)
  out = mapper(jnp.asarray(z_img))
  rec, dice = 0.0, 0.0
  for h in heads:
    pred = np.asarray(out[h], np.float32)
    for c in (1, 2):
      m = (lab == c).astype(np.float32)
      zm = np.asarray(tok.encode(tok.params, np.repeat(m[..., None], 3, -1)).z)
      part = pred[..., (c - 1) * L : c * L]
      rec += np.mean((part - zm) ** 2) / 2
      dice += _np_dice(np.asarray(tok.decode_mask(tok.params, part)), m) / 2
  np.testing.assert_allclose(float(terms["rec"]), rec, rtol=2e-5)
  np.testing.assert_allclose(float(terms["dice"]), dice, rtol=2e-5)
  np.testing.assert_allclose(float(got), rec + dice, rtol=2e-5)


def test_binary_classes_change_nothing():
  tok = tiny_tokenizer(0)
  mapper = ResAttnUNet_DS(MapperConfig(in_channels=4, out_channels=4, ch=16), rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(mapper, nnx.Param)
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  mask = (rng.uniform(size=(2, 16, 16)) > 0.5).astype(np.float32)
  kw = dict(apply_noise=False, eps=None)
  a = loss_lib.gms_loss(graphdef, params, tok, tok.params, images, mask, **kw)[0]
  b = loss_lib.gms_loss(
    graphdef, params, tok, tok.params, images, mask, classes=classes_lib.Classes(2), **kw
  )[0]
  assert float(a) == float(b)


# ----------------------------------------------------------------------------- metrics


def test_per_class_metrics_hand_computed():
  gt = np.zeros((4, 4), np.uint8)
  pred = np.zeros((4, 4), np.uint8)
  gt[0, :2] = 1  # class 1: 2 pixels
  pred[0, 1:3] = 1  # 1 overlap, 1 false positive, 1 false negative -> DSC 0.5, IoU 1/3
  gt[3, 3] = 2  # class 2 in the truth only -> DSC 0
  # class 3 absent from both -> absent (NaN), not 0 or 1
  d, i = metrics.class_dice_iou(pred, gt, 4)
  np.testing.assert_allclose(d[:2], [0.5, 0.0])
  np.testing.assert_allclose(i[:2], [1 / 3, 0.0])
  assert np.isnan(d[2]) and np.isnan(i[2])
  row = metrics.per_image_classes(pred, gt, ("bg", "a", "b", "c"))
  assert np.isnan(row["dsc_c"]) and np.isnan(row["hd95_c"])
  assert row["dsc"] == pytest.approx(0.25)  # mean over the classes present: (0.5 + 0) / 2
  assert row["dsc_fg"] == pytest.approx(2 * 1 / (2 + 3))  # merged: TP 1, |P| 2, |G| 3
  summ = metrics.summarize_nan([row, dict(row, dsc_c=1.0)], ["dsc_c", "dsc_a"])
  assert summ["dsc_c"] == {"mean": 1.0, "std": 0.0, "n": 1}
  assert summ["dsc_a"]["n"] == 2


def test_lesion_type_and_confusion():
  lab = np.array([[1, 2, 2], [0, 1, 0]])
  assert metrics.lesion_type(lab, 3) == 1  # tie 2:2 -> the lower id
  assert metrics.lesion_type(np.zeros((2, 2)), 3) == 0
  conf = metrics.type_confusion([1, 1, 2, 2], [1, 2, 2, 0], 3)
  np.testing.assert_array_equal(conf, [[0, 0, 0], [0, 1, 1], [1, 0, 1]])


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
  "text, fragment",
  [
    ("{", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"labels": {"background": 0, "a": 2}}', "consecutive from 0; missing [1]"),
    ('{"labels": {"background": 1, "a": 2}}', "background must be 0"),
    ('{"labels": {"background": 0, "a": [1, 2]}}', "ids must be integers"),
    ('{"labels": {"background": 0, "a": "1"}}', "ids must be integers"),
    ('{"labels": {"background": 0, "a": 1, "b": 1}}', "given to more than one class"),
    ('{"labels": {"background": 0}}', "only the background"),
    ('{"labels": []}', "must be an object"),
  ],
)
def test_hostile_dataset_json(tmp_path, text, fragment):
  (tmp_path / "dataset.json").write_text(text)
  with pytest.raises(DataError) as e:
    labels.read_labels(tmp_path)
  msg = str(e.value)
  assert fragment in msg and str(tmp_path / "dataset.json") in msg and "\n" not in msg


def test_binary_and_label_folders(tmp_path):
  assert labels.read_labels(tmp_path) is None  # no dataset.json: binary
  (tmp_path / "dataset.json").write_text('{"name": "x"}')
  assert labels.read_labels(tmp_path) is None  # no labels: binary
  (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"b": 1, "background": 0}}))
  assert labels.read_labels(tmp_path) == ("background", "b")
  # a two-label folder holds 0/1 maps; they are read as the binary 0/255 mask
  Image.fromarray(np.array([[0, 1]], np.uint8)).save(tmp_path / "m.png")
  np.testing.assert_array_equal(checks.read_mask(tmp_path / "m.png", 2), [[0, 255]])


def _write_case(root, stem, lab, *, mode="L"):
  img = np.full(lab.shape[:2] + (3,), 128, np.uint8)
  Image.fromarray(img).save(root / "images" / f"{stem}.png")
  Image.fromarray(lab, mode=mode).save(root / "masks" / f"{stem}.png")


HOSTILE_MAPS = {
  "value_outside": (np.array([[0, 1], [2, 5]], np.uint8), "L", "label values 5 outside"),
  "binary_255": (np.array([[0, 255], [0, 255]], np.uint8), "L", "a binary 0/255 mask"),
  "colour": (
    np.array([[[0, 0, 0], [1, 2, 1]], [[0, 0, 0], [0, 0, 0]]], np.uint8),
    "RGB",
    "colour label map",
  ),
}


def test_check_data_hostile_label_maps(tmp_path):
  root = make_dataset(tmp_path / "d", n=8, size=32)
  for stem, (lab, mode, _) in HOSTILE_MAPS.items():
    _write_case(root, stem, lab, mode=mode)
  p = run_cli("check-data", root)
  assert p.returncode == 1
  for stem, (_, _, fragment) in HOSTILE_MAPS.items():
    lines = [ln for ln in p.stdout.splitlines() if f"{stem}.png" in ln]
    assert len(lines) == 1 and fragment in lines[0], (stem, p.stdout)
  assert "0 background: 8 case(s)" in p.stdout  # the counts are of the maps that were read
  assert "2 disc:" in p.stdout and "pixels" in p.stdout


def test_check_data_reports_classes(tmp_path):
  root = make_dataset(tmp_path / "d", n=8, size=32)
  p = run_cli("check-data", root)
  assert p.returncode == 0, p.stdout + p.stderr
  lab = np.stack([np.asarray(Image.open(f)) for f in sorted((root / "masks").iterdir())])
  for c, name in enumerate(LABELS):
    cases = int(sum((m == c).any() for m in lab))
    assert f"{c} {name}: {cases} case(s), {int((lab == c).sum()):,} pixels" in p.stdout


def test_train_refuses_a_hostile_label_map(tmp_path):
  root = make_dataset(tmp_path / "d", n=12, size=32)
  _write_case(root, "bad", np.array([[0, 1], [2, 7]], np.uint8))
  p = run_cli(
    "train",
    "--config",
    "folder,smoke",
    f"--config.data.root={root}",
    f"--config.data.tfds_dir={tmp_path / 'tfds'}",
    "--workdir",
    tmp_path / "w",
  )
  assert p.returncode != 0
  assert "Traceback" not in p.stderr
  assert "bad.png: label values 7 outside the declared ids 0..2" in p.stderr
  assert not (tmp_path / "w").exists()


def test_num_classes_must_match_the_data(tmp_path):
  root = make_dataset(tmp_path / "d", n=8, size=32)
  p = run_cli(
    "train",
    "--config",
    "folder,smoke",
    f"--config.data.root={root}",
    "--config.data.num_classes=4",
    "--workdir",
    tmp_path / "w",
  )
  assert p.returncode == 2, p.stderr
  err = p.stderr.strip().splitlines()
  assert len(err) == 1 and "config.data.num_classes=4" in err[0] and "declares 3 classes" in err[0]


# ----------------------------------------------------------------------------- compile


def test_multiclass_steps_lower_with_class_channels():
  from gms_jax import parallel
  from gms_jax import step as step_lib
  from gms_jax.configs import gms

  for arg, coding, out in (("sample,smoke", "channels", 96), ("sample,smoke,fast", "palette", 32)):
    config = gms.get_config(arg)
    config.data.num_classes = 4
    config.mask_coding = coding
    built = step_lib.build(config, parallel.make_mesh(jax.devices()[:1]), steps_per_epoch=3)
    assert built.mapper_cfg.out_channels == out
    for name in built.step_names:
      built.lower_train(name)  # traces and lowers every program of the recipe
      if "z_mask" in built.batch_shapes[name]:
        assert built.batch_shapes[name]["z_mask"].shape[-1] == out
    built.lower_predict(2)


# ----------------------------------------------------------------------------- end to end


def _baselines(root, test_names):
  """Per-class mean DSC over the test images of (a) all background (0 wherever the class is in
  the truth) and (b) every pixel the majority foreground class (of the whole dataset's pixels)."""
  gts = {n: np.asarray(Image.open(root / "masks" / f"{n}.png")) for n in test_names}
  allpix = np.concatenate([np.asarray(Image.open(f)).ravel() for f in (root / "masks").iterdir()])
  major = 1 + int(np.argmax(np.bincount(allpix, minlength=3)[1:]))
  best = {}
  for c in (1, 2):
    b = [metrics.class_dice_iou(np.full_like(g, major), g, 3)[0][c - 1] for g in gts.values()]
    best[c] = max(0.0, float(metrics.nanmean(b)))
  return best


@pytest.mark.parametrize("recipe", ["exact", "fast"])
def test_multiclass_run_beats_baselines(multiclass_runs, recipe, tmp_path):
  runs = multiclass_runs
  out = tmp_path / "eval"
  p = run_cli("evaluate", "--workdir", runs[recipe], "--split", "test", "--out", out)
  assert p.returncode == 0, p.stderr[-4000:]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["classes"] == list(LABELS)
  with open(out / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  base = _baselines(runs["root"], [r["name"] for r in rows])
  for c, name in ((1, "square"), (2, "disc")):
    got = summary[f"dsc_{name}"]["mean"]
    assert got > base[c] + 0.1, (recipe, name, got, base)
  # label maps, values in the declared ids; absent classes written as "absent"
  m = np.asarray(Image.open(out / "masks" / f"{rows[0]['name']}.png"))
  assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 1, 2}
  cfg = json.loads((runs[recipe] / "config.json").read_text())
  assert cfg["data"]["num_classes"] == 3 and cfg["data"]["class_names"] == list(LABELS)


def test_multiclass_predict_tta_export_import(multiclass_runs, tmp_path):
  from gms_jax.predict import Segmenter

  runs = multiclass_runs
  wd = runs["fast"]
  # predict: a label map at the native size of an image of another size
  img = np.asarray(Image.open(sorted((runs["root"] / "images").iterdir())[0]))
  Image.fromarray(img).resize((80, 72)).save(tmp_path / "x.png")
  p = run_cli("predict", "--workdir", wd, "--out", tmp_path / "pred", tmp_path / "x.png")
  assert p.returncode == 0, p.stderr[-3000:]
  m = np.asarray(Image.open(tmp_path / "pred" / "x.png"))
  assert m.shape == (72, 80) and set(np.unique(m)) <= {0, 1, 2} and len(np.unique(m)) > 1
  # test-time views run on class scores
  p = run_cli(
    "evaluate", "--workdir", wd, "--split", "test", "--tta", "flip", "--out", tmp_path / "t"
  )
  assert p.returncode == 0, p.stderr[-3000:]
  # export -> import: the class channels travel in the weights' shapes, the values unchanged
  p = run_cli("export", "--workdir", wd, "--format", "safetensors", tmp_path / "m.safetensors")
  assert p.returncode == 0, p.stderr[-3000:]
  p = run_cli(
    "import",
    "--config",
    "folder,smoke,fast",
    f"--config.data.root={runs['root']}",
    "--config.data.image_size=64",
    "--mapper",
    tmp_path / "m.safetensors",
    "--workdir",
    tmp_path / "imported",
  )
  assert p.returncode == 0, p.stderr[-3000:]
  a, b = Segmenter.from_workdir(str(wd)), Segmenter.from_workdir(str(tmp_path / "imported"))
  assert a.classes.num_classes == b.classes.num_classes == 3
  x = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  np.testing.assert_array_equal(a.predict_probs(x), b.predict_probs(x))
  c = Segmenter.from_pretrained(str(tmp_path / "m.safetensors"), "", image_size=64)
  assert c.classes.num_classes == 3
  np.testing.assert_allclose(c.predict_probs(x), a.predict_probs(x), atol=1e-6)


def test_two_label_folder_reads_0_1_and_0_255_masks_as_binary(tmp_path):
  """nnU-Net-style binary folders carry {"background": 0, "lesion": 1}: their 0/1 maps (and
  0/255 masks) are the binary task, with the binary folder's class names (none)."""
  from gms_jax.data import builder

  root = tmp_path / "d"
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  m = np.zeros((16, 16), np.uint8)
  m[4:9, 4:9] = 1
  for k in range(10):
    _write_case(root, f"a{k}", m if k % 2 else m * 255)
  (root / "dataset.json").write_text('{"labels": {"background": 0, "lesion": 1}}')
  cfg = {"name": "folder", "root": str(root), "tfds_dir": str(tmp_path / "tfds")}
  src = builder.prepare(cfg)
  assert src["train"].num_classes == 2 and src["train"].class_names == ()
  for split in src.values():
    for i in range(len(split)):
      np.testing.assert_array_equal(split[i]["mask"], m * 255)


def test_reserved_and_inverted_labels_are_refused(tmp_path):
  (tmp_path / "dataset.json").write_text('{"labels": {"background": 0, "fg": 1, "x": 2}}')
  with pytest.raises(DataError, match="'fg' is empty or reserved"):
    labels.read_labels(tmp_path)
  (tmp_path / "dataset.json").write_text('{"labels": {"0": "background", "1": "lesion"}}')
  with pytest.raises(DataError, match="nnU-Net v1's form"):
    labels.read_labels(tmp_path)
