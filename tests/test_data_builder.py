"""Folder -> tfds ArrayRecord builds: the shipped sample, formats, bad inputs, atomicity, CLI."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gms_jax.cli import check_data as check_data_cli
from gms_jax.data import builder, checks, splits
from gms_jax.data.checks import DataError

REPO = Path(__file__).resolve().parents[1]


def _cfg(root, tfds_dir, name="folder", **kw):
  cfg = dict(
    name=name,
    root=str(root),
    split_file="",
    test_fraction=0.2,
    val_fraction=0.1,
    split_seed=2333,
    image_size=32,
    tfds_dir=str(tfds_dir),
    worker_count=0,
    prefetch_buffer=2,
  )
  cfg.update(kw)
  return cfg


def make_folder(root: Path, n: int = 12, size=(40, 30)) -> Path:
  """n pairs: grey 'L' images with a bright square, masks 0/255 of that square."""
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  w, h = size
  rng = np.random.default_rng(0)
  for i in range(n):
    img = rng.integers(0, 100, (h, w), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[5 + i % 5 : 15 + i % 5, 8:20] = 255
    img[mask > 0] = 220
    Image.fromarray(img).save(root / "images" / f"case_{i:02d}.png")
    Image.fromarray(mask).save(root / "masks" / f"case_{i:02d}.png")
  return root


def _no_dataset_left(tfds_dir: Path):
  left = [p for p in tfds_dir.rglob("*") if "array_record" in p.name or "incomplete" in p.name]
  assert not left, left
  assert not list((tfds_dir / "gms_segmentation").glob("folder-*")) if tfds_dir.exists() else True


# --------------------------------------------------------------------------------------------
# The shipped sample
# --------------------------------------------------------------------------------------------


def test_sample_is_shipped():
  root = builder.sample_root()
  assert (root / "SOURCE.md").is_file() and (root / "split.json").is_file()
  scan = checks.scan_folder(root)
  assert not scan.problems and 24 <= len(scan.pairs) <= 60
  for p in scan.pairs[:3]:
    assert max(Image.open(p.image).size) <= 224


def test_prepare_sample(tmp_path):
  src = builder.prepare(_cfg("", tmp_path, name="sample"))
  assert {k: len(v) for k, v in src.items()} == {"train": 29, "validation": 3, "test": 8}
  spec = json.loads((builder.sample_root() / "split.json").read_text())
  assert sorted(src["test"].names()) == sorted(spec["test"])
  assert src["test"].names() == sorted(spec["test"])  # records are in name order
  names = {k: set(v.names()) for k, v in src.items()}
  assert not names["train"] & names["validation"] and not names["validation"] & names["test"]
  rec = src["train"][0]
  assert rec["image"].dtype == np.uint8 and rec["image"].ndim == 3 and rec["image"].shape[2] == 3
  assert rec["mask"].dtype == np.uint8 and rec["mask"].shape == rec["image"].shape[:2]
  assert set(np.unique(rec["mask"])) <= {0, 255} and isinstance(rec["name"], str)
  on_disk = np.asarray(Image.open(builder.sample_root() / "images" / f"{rec['name']}.png"))
  np.testing.assert_array_equal(rec["image"], on_disk)
  # prepared once: the second call reuses the build
  files = sorted(tmp_path.rglob("*.array_record*"))
  assert len(files) == 3
  mtimes = [f.stat().st_mtime_ns for f in files]
  builder.prepare(_cfg("", tmp_path, name="sample"))
  assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_configs_do_not_collide(tmp_path):
  root = make_folder(tmp_path / "ds", n=20)
  a = builder.prepare(_cfg(root, tmp_path / "tfds", val_fraction=0.1))
  b = builder.prepare(_cfg(root, tmp_path / "tfds", val_fraction=0.25))
  c = builder.prepare(_cfg(root, tmp_path / "tfds", split_seed=1))
  assert len(a["validation"]) == 2 and len(b["validation"]) == 4
  dirs = {s["train"].directory for s in (a, b, c)}
  assert len(dirs) == 3
  assert set(a["test"].names()) != set(c["test"].names())


def test_no_tensorflow_and_array_record(tmp_path):
  code = textwrap.dedent(f"""
        import sys
        from gms_jax.data import builder
        cfg = dict(name="sample", root="", split_file="", tfds_dir={str(tmp_path)!r})
        src = builder.prepare(cfg)
        b = builder.make_builder(*builder.make_config(cfg))
        assert b.info.file_format.value == "array_record", b.info.file_format
        _ = [src[s][0]["image"].sum() for s in src]
        bad = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
        assert not bad, bad
        print("OK")
    """)
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
  )
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
  assert list(tmp_path.rglob("gms_segmentation-train.array_record-*"))


def test_formats_are_converted_to_rgb(tmp_path):
  root = tmp_path / "ds"
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  rng = np.random.default_rng(1)
  h, w = 20, 24
  m = np.zeros((h, w), np.uint8)
  m[4:12, 6:18] = 255
  rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
  grey = rng.integers(0, 255, (h, w), dtype=np.uint8)
  expected = {}

  def save(stem, img, ext, mask_img):
    img.save(root / "images" / f"{stem}.{ext}")
    mask_img.save(root / "masks" / f"{stem}.png")
    expected[stem] = np.asarray(Image.open(root / "images" / f"{stem}.{ext}").convert("RGB"))

  save("a_grey", Image.fromarray(grey), "png", Image.fromarray(m))
  save("b_rgba", Image.fromarray(np.dstack([rgb, grey])), "png", Image.fromarray(m).convert("1"))
  save("c_jpg", Image.fromarray(rgb), "jpg", Image.fromarray(np.dstack([m, m, m])))
  save("d_bmp", Image.fromarray(rgb), "bmp", Image.fromarray(m).convert("P"))
  save("e_tif", Image.fromarray(rgb), "tif", Image.fromarray(m))
  save("f_rgbgrey", Image.fromarray(np.dstack([grey] * 3)), "png", Image.fromarray(m))
  g16 = grey.astype(np.uint16) * 257
  Image.fromarray(g16).save(root / "images" / "g_16bit.png")
  Image.fromarray(m).save(root / "masks" / "g_16bit.png")
  expected["g_16bit"] = np.repeat(grey[..., None], 3, -1)
  for i in range(3):  # filler so every split is non-empty
    save(f"h_{i}", Image.fromarray(rgb), "png", Image.fromarray(m))
  split = {"train": sorted(expected)[:-1], "validation": sorted(expected)[-1:], "test": ["h_0"]}
  split["train"].remove("h_0")
  (root / "split.json").write_text(json.dumps(split))
  src = builder.prepare(_cfg(root, tmp_path / "tfds"))
  for s in src.values():
    for i in range(len(s)):
      rec = s[i]
      np.testing.assert_array_equal(rec["image"], expected[rec["name"]], err_msg=rec["name"])
      np.testing.assert_array_equal(rec["mask"], m, err_msg=rec["name"])


# --------------------------------------------------------------------------------------------
# Bad inputs: one DataError naming the file, no partial dataset, check-data lists them all
# --------------------------------------------------------------------------------------------


def _corrupt(root):
  (root / "images" / "case_03.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
  return "case_03.png", "cannot decode image"


def _truncated(root):
  p = root / "images" / "case_04.png"
  p.write_bytes(p.read_bytes()[:150])
  return "case_04.png", "cannot decode image"


def _mask_missing(root):
  (root / "masks" / "case_05.png").unlink()
  return "case_05.png", "image has no mask"


def _image_missing(root):
  (root / "images" / "case_06.png").unlink()
  return "case_06.png", "mask has no image"


def _size_mismatch(root):
  Image.fromarray(np.zeros((31, 40), np.uint8)).save(root / "masks" / "case_07.png")
  return "case_07.png", r"mask is 40x31 .* is 40x30"


def _mask_01(root):
  m = (np.asarray(Image.open(root / "masks" / "case_08.png")) > 0).astype(np.uint8)
  Image.fromarray(m).save(root / "masks" / "case_08.png")
  return "case_08.png", "0/1"


def _mask_16bit(root):
  m = np.asarray(Image.open(root / "masks" / "case_09.png")).astype(np.uint16) * 257
  Image.fromarray(m).save(root / "masks" / "case_09.png")
  return "case_09.png", "16/32-bit"


def _mask_rgb(root):
  m = np.asarray(Image.open(root / "masks" / "case_10.png"))
  Image.fromarray(np.dstack([m, np.zeros_like(m), np.zeros_like(m)])).save(
    root / "masks" / "case_10.png"
  )
  return "case_10.png", "colour mask"


def _mask_grey_levels(root):
  m = np.asarray(Image.open(root / "masks" / "case_11.png")).copy()
  m[0, 0] = 128
  Image.fromarray(m).save(root / "masks" / "case_11.png")
  return "case_11.png", "values other than 0 and 255"


def _duplicate_stem(root):
  Image.open(root / "images" / "case_01.png").save(root / "images" / "case_01.jpg")
  return "case_01", "several image files share the stem"


def _empty_split(root):
  (root / "split.json").write_text(
    json.dumps({"train": [f"case_{i:02d}" for i in range(12)], "test": []})
  )
  return "split.json", "split 'test' is empty"


def _missing_split_name(root):
  (root / "split.json").write_text(
    json.dumps({"train": ["case_00", "case_01", "nope"], "test": ["case_02"]})
  )
  return "split.json", "do not exist.*'nope'"


def _malicious_pickle(root):
  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {root / 'pwned'}",))

  (root / "x_train_test_names.pkl").write_bytes(
    pickle.dumps({"train": {"name_list": [Evil()]}, "test": {"name_list": []}})
  )
  return "x_train_test_names.pkl", "refusing"


def _empty_folder(root):
  for p in list((root / "images").iterdir()) + list((root / "masks").iterdir()):
    p.unlink()
  return str(root), "no image/mask pairs"


BAD_INPUTS = [
  _corrupt,
  _truncated,
  _mask_missing,
  _image_missing,
  _size_mismatch,
  _mask_01,
  _mask_16bit,
  _mask_rgb,
  _mask_grey_levels,
  _duplicate_stem,
  _empty_split,
  _missing_split_name,
  _malicious_pickle,
  _empty_folder,
]


@pytest.mark.parametrize("breaker", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_gives_one_named_error_and_no_dataset(tmp_path, breaker):
  root = make_folder(tmp_path / "ds")
  fname, problem = breaker(root)
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(DataError, match=problem) as e:
    builder.prepare(_cfg(root, tfds_dir))
  assert fname in str(e.value)
  _no_dataset_left(tfds_dir)
  assert not (root / "pwned").exists()
  # check-data finds the same problem
  scan, _ = checks.check_folder(root)
  assert any(fname in p for p in scan.problems), scan.problems


def test_failed_build_leaves_nothing(tmp_path):
  """A file that breaks while the *last* split is being written: the finished splits go too."""
  root = make_folder(tmp_path / "ds", n=20)
  cfg = _cfg(root, tmp_path / "tfds")
  conf, tfds_dir = builder.make_config(cfg)
  last_test = dict(conf.split_names)["test"][-1]
  (root / "images" / f"{last_test}.png").write_bytes(b"garbage")
  with pytest.raises(DataError, match=f"{last_test}.png: cannot decode image"):
    builder.prepare(cfg)
  _no_dataset_left(Path(tfds_dir))


def test_check_data_reports_everything_at_once(tmp_path, capsys):
  root = make_folder(tmp_path / "ds")
  expected = [f(root)[0] for f in (_corrupt, _mask_missing, _size_mismatch, _mask_01, _mask_rgb)]
  assert check_data_cli.main([str(root)]) == 1
  out = capsys.readouterr().out
  for fname in expected:
    assert fname in out
  assert out.count("ERROR") == len(expected)
  assert check_data_cli.main([str(builder.sample_root()), "-q"]) == 0
  assert "0 problem(s)" in capsys.readouterr().out
  assert check_data_cli.main([str(tmp_path / "nowhere")]) == 1


def test_unknown_name_and_missing_root(tmp_path):
  with pytest.raises(DataError, match="unknown dataset name"):
    builder.prepare(_cfg(tmp_path, tmp_path, name="glas"))
  with pytest.raises(DataError, match="data.root is empty"):
    builder.prepare(_cfg("", tmp_path, name="busi"))


def test_split_description_in_metadata(tmp_path):
  root = make_folder(tmp_path / "ds")
  src = builder.prepare(_cfg(root, tmp_path / "tfds"))
  meta = json.loads((Path(src["train"].directory) / "metadata.json").read_text())
  assert meta["dataset"] == "folder"
  assert sorted(meta["split_names"]["test"]) == sorted(src["test"].names())
  assert splits.Splits  # module is importable alongside


def test_truncated_cache_is_detected_and_rebuilt(tmp_path, caplog):
  """A cached shard cut short (a killed copy, a full disk) is found by its record
  count and rebuilt, naming the file; the rebuilt dataset reads back completely."""
  root = make_folder(tmp_path / "data", n=12)
  cfg = _cfg(root, tmp_path / "tfds")
  first = builder.prepare(cfg)
  expected = [first["train"][i]["name"] for i in range(len(first["train"]))]
  shard = next((tmp_path / "tfds").rglob("gms_segmentation-train.array_record-*"))
  assert builder.verify_cache(builder.make_builder(*builder.make_config(cfg))) is None
  size = shard.stat().st_size
  with open(shard, "r+b") as fh:
    fh.truncate(size // 2)
  with caplog.at_level("WARNING"):
    again = builder.prepare(cfg)
  warned = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
  assert len(warned) == 1 and str(shard) in warned[0]
  assert shard.stat().st_size == size
  assert [again["train"][i]["name"] for i in range(len(again["train"]))] == expected
