"""Split files (restricted unpickler, JSON), ratio / grouped / official splits, validation carve."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from gms_jax.data import splits
from gms_jax.data.checks import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BUSI_PKL = SHARED / "data" / "busi" / "busi_train_test_names.pkl"


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
  marker = tmp_path / "pwned"
  evil = tmp_path / "evil_train_test_names.pkl"
  evil.write_bytes(pickle.dumps({"train": {"name_list": [_Evil(marker)]}, "test": {}}))
  with pytest.raises(DataError, match=r"refusing.*(posix|os|nt)\.system"):
    splits.load_gms_pickle(evil)
  with pytest.raises(DataError, match="refusing"):
    splits.load_split_file(evil)
  assert not marker.exists()


@pytest.mark.parametrize(
  "payload, match",
  [
    (pickle.dumps({"train": {"name_list": ["a"]}, "test": {"name_list": [eval]}}), "refusing"),
    (pickle.dumps({"train": ("a",), "test": ["b"]}), "tuple"),
    (pickle.dumps({"train": [b"a"], "test": ["b"]}), "bytes"),
    (pickle.dumps({"train": ["a"], "test": {1.5}}), "refusing|set"),
    (b"\x80\x04not a pickle", "not a readable split pickle"),
    (pickle.dumps(["a", "b"]), "dict of splits"),
    (pickle.dumps({"train": ["a"]}), "no 'test' split"),
    (pickle.dumps({"train": ["a"], "test": ["b"], "holdout": ["c"]}), "unknown split"),
  ],
)
def test_bad_pickles_are_refused(tmp_path, payload, match):
  f = tmp_path / "x.pkl"
  f.write_bytes(payload)
  with pytest.raises(DataError, match=match) as e:
    splits.load_gms_pickle(f)
  assert str(f) in str(e.value)


@pytest.mark.skipif(not BUSI_PKL.is_file(), reason=f"GMS BUSI split not present at {BUSI_PKL}")
def test_real_busi_pickle_and_validation_carve():
  spec = splits.load_gms_pickle(BUSI_PKL)
  assert len(spec["train"]) == 517 and len(spec["test"]) == 130
  assert not set(spec["train"]) & set(spec["test"])
  names = spec["train"] + spec["test"] + ["extra_not_in_split"]
  s1 = splits.resolve_splits(names, dataset="busi", split_file=BUSI_PKL)
  s2 = splits.resolve_splits(list(reversed(names)), dataset="busi", split_file=BUSI_PKL)
  assert s1 == s2  # stable across runs and listing order
  assert len(s1.test) == 130 and len(s1.validation) == 52 and len(s1.train) == 465
  assert set(s1.test) == set(spec["test"])
  assert set(s1.train) | set(s1.validation) == set(spec["train"])
  assert not set(s1.train) & set(s1.validation)
  assert not set(s1.validation) & set(s1.test)
  other = splits.resolve_splits(names, dataset="busi", split_file=BUSI_PKL, seed=1)
  assert set(other.validation) != set(s1.validation)


def test_json_formats(tmp_path):
  names = [f"n{i:02d}" for i in range(20)]
  f = tmp_path / "split.json"
  f.write_text(json.dumps({"train": names[:15], "test": [n + ".png" for n in names[15:]]}))
  s = splits.resolve_splits(names, split_file=f, val_fraction=0.2)
  assert s.test == tuple(names[15:]) and len(s.validation) == 3 and len(s.train) == 12
  f.write_text(
    json.dumps(
      {
        "train": {"name_list": names[:10]},
        "validation": names[10:12],
        "test": {"name_list": names[12:]},
      }
    )
  )
  s = splits.resolve_splits(names, split_file=f)
  assert s.as_dict() == {
    "train": tuple(names[:10]),
    "validation": tuple(names[10:12]),
    "test": tuple(names[12:]),
  }


@pytest.mark.parametrize(
  "spec, match",
  [
    ({"train": ["n00", "n01"], "test": []}, "split 'test' is empty"),
    ({"train": ["n00", "ghost"], "test": ["n02"]}, "do not exist.*'ghost'"),
    ({"train": ["n00", "n01"], "test": ["n01"]}, "both 'train' and 'test'"),
    ({"train": ["n00", "n00"], "test": ["n01"]}, "twice"),
    ({"train": "n00", "test": ["n01"]}, "list of file names"),
  ],
)
def test_split_file_errors_name_the_file(tmp_path, spec, match):
  f = tmp_path / "split.json"
  f.write_text(json.dumps(spec))
  with pytest.raises(DataError, match=match) as e:
    splits.resolve_splits([f"n{i:02d}" for i in range(5)], split_file=f)
  assert str(f) in str(e.value)


def test_ratio_split_is_seeded_stable_and_disjoint():
  names = [f"img{i:03d}" for i in range(100)]
  s = splits.resolve_splits(names, test_fraction=0.2, val_fraction=0.1, seed=2333)
  assert (len(s.train), len(s.validation), len(s.test)) == (72, 8, 20)
  assert set(s.train) | set(s.validation) | set(s.test) == set(names)
  assert len(set(s.train) | set(s.validation) | set(s.test)) == 100
  assert s == splits.resolve_splits(reversed(names), test_fraction=0.2, seed=2333)
  assert s.test != splits.resolve_splits(names, test_fraction=0.2, seed=7).test
  # adding a file never moves an existing file to another split (hash ranking)
  _, held = splits.ratio_split(names + ["img999"], 0.2, 2333, purpose="test")
  assert set(held) - {"img999"} <= set(s.test)


def test_validation_split_required():
  with pytest.raises(DataError, match="validation.*empty"):
    splits.resolve_splits([f"n{i}" for i in range(10)], val_fraction=0.0)
  with pytest.raises(DataError, match="no image/mask pairs"):
    splits.resolve_splits([])


def test_grouped_and_official_rules():
  busbra = [f"bus_{i:04d}-{s}" for i in range(1, 60) for s in ("l", "r")]
  s = splits.resolve_splits(busbra, dataset="bus-bra")
  patients = {k: {n.split("-")[0] for n in v} for k, v in s.as_dict().items()}
  assert not patients["train"] & patients["test"]
  assert not patients["train"] & patients["validation"]
  assert not patients["validation"] & patients["test"]
  drive = [f"{i:02d}_test" for i in range(1, 21)] + [f"{i:02d}_training" for i in range(21, 41)]
  s = splits.resolve_splits(drive, dataset="drive")
  assert all(n.endswith("_test") for n in s.test) and len(s.test) == 20
  assert len(s.validation) == 2 and all(n.endswith("_training") for n in s.validation)


def test_default_split_file(tmp_path):
  assert splits.default_split_file("folder", tmp_path) is None
  (tmp_path / "foo_train_test_names.pkl").write_bytes(b"")
  assert splits.default_split_file("folder", tmp_path).endswith("foo_train_test_names.pkl")
  (tmp_path / "split.json").write_text("{}")
  assert splits.default_split_file("busi", tmp_path).endswith("split.json")


def test_split_file_reports_every_split_missing_names_and_unused_pairs(tmp_path, caplog):
  """Missing names of ALL splits in one error; pairs in no split are warned about."""
  names = [f"n{i:02d}" for i in range(8)]
  f = tmp_path / "split.json"
  f.write_text(json.dumps({"train": ["n00", "ghost1"], "val": ["n01"], "test": ["ghost2"]}))
  with pytest.raises(DataError) as e:
    splits.resolve_splits(names, split_file=f)
  msg = str(e.value)
  assert str(f) in msg and "'ghost1'" in msg and "'ghost2'" in msg
  assert "split 'train'" in msg and "split 'test'" in msg and "\n" not in msg
  f.write_text(json.dumps({"train": ["n00", "n01"], "valid": ["n02"], "test": ["n03"]}))
  with caplog.at_level("WARNING"):
    s = splits.resolve_splits(names, split_file=f)
  assert s.validation == ("n02",)  # "valid" / "val" name the validation split
  warned = [r.getMessage() for r in caplog.records if "in no split" in r.getMessage()]
  assert len(warned) == 1 and "4 image/mask pair(s)" in warned[0] and "'n04'" in warned[0]
  f.write_text(
    json.dumps({"train": ["n00"], "val": ["n01"], "validation": ["n02"], "test": ["n03"]})
  )
  with pytest.raises(DataError, match="validation split is given twice"):
    splits.resolve_splits(names, split_file=f)
