"""grain pipeline: batches, determinism, resumable state, per-process sharding, eval examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gms_jax.data import builder, pipeline
from gms_jax.data.checks import DataError


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
  return builder.prepare(dict(name="sample", tfds_dir=str(tmp_path_factory.mktemp("tfds"))))


def _ids_source(n):
  """Records whose (constant) image value is their index: recoverable after a resize."""
  return [
    {
      "image": np.full((10, 12, 3), i, np.uint8),
      "mask": np.zeros((10, 12), np.uint8),
      "name": str(i),
    }
    for i in range(n)
  ]


def _ids(batch):
  return [int(round(float(v) * 255)) for v in batch["image"][:, 0, 0, 0]]


def _train(source, **kw):
  args = dict(global_batch_size=8, image_size=32, seed=0, process_index=0, process_count=1)
  args.update(kw)
  return pipeline.train_dataset(source, **args)


def _take(it, k):
  return [next(it) for _ in range(k)]


def _same(xs, ys):
  return len(xs) == len(ys) and all(
    np.array_equal(x["image"], y["image"]) and np.array_equal(x["mask"], y["mask"])
    for x, y in zip(xs, ys)
  )


def test_batch_format(sample):
  batch = next(iter(_train(sample["train"], image_size=64)))
  assert set(batch) == {"image", "mask"}
  assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (8, 64, 64) and batch["mask"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert set(np.unique(batch["mask"])) == {0.0, 1.0}


def test_same_seed_same_batches_and_exact_resume(sample):
  ds = _train(sample["train"], seed=7)
  a = _take(iter(ds), 4)
  b = _take(iter(_train(sample["train"], seed=7)), 4)
  assert _same(a, b)
  assert not _same(a, _take(iter(_train(sample["train"], seed=8)), 4))
  it = iter(ds)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))  # serialisable, e.g. into a checkpoint
  rest = _take(it, 3)
  fresh = iter(_train(sample["train"], seed=7))  # a new pipeline, as after a restart
  fresh.set_state(state)
  assert _same(_take(fresh, 3), rest)
  assert _same(a[2:4], rest[:2])


def test_two_processes_cover_each_epoch_once():
  n, global_batch = 21, 4
  steps = pipeline.steps_per_epoch(n, global_batch)
  assert steps == 5
  per_host = []
  for pi in range(2):
    ds = _train(
      _ids_source(n),
      global_batch_size=global_batch,
      image_size=8,
      augment=False,
      process_index=pi,
      process_count=2,
    )
    batches = _take(iter(ds), 2 * steps)
    assert all(b["image"].shape[0] == global_batch // 2 for b in batches)
    per_host.append([_ids(b) for b in batches])
  epochs = []
  for e in range(2):
    host_ids = [sum(h[e * steps : (e + 1) * steps], []) for h in per_host]
    assert len(host_ids[0]) == len(host_ids[1]) == steps * global_batch // 2
    union = host_ids[0] + host_ids[1]
    assert len(set(union)) == len(union) == steps * global_batch  # each example at most once
    assert set(union) <= set(range(n))
    epochs.append(union)
  assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_single_process_epochs_and_steps():
  ds = _train(_ids_source(21), global_batch_size=4, image_size=8, augment=False)
  ids = [_ids(b) for b in _take(iter(ds), 10)]
  first, second = sum(ids[:5], []), sum(ids[5:], [])
  assert len(set(first)) == 20 and len(set(second)) == 20
  assert pipeline.steps_per_epoch(517, 8) == 64
  with pytest.raises(DataError, match="fewer than one global batch"):
    pipeline.steps_per_epoch(7, 8)
  with pytest.raises(ValueError, match="divisible"):
    _train(_ids_source(21), global_batch_size=5, process_count=2)


def test_worker_processes_match_and_resume(sample):
  """2 grain worker processes give the same batches as none, and resume exactly."""
  ref = _take(iter(_train(sample["train"], seed=3)), 4)
  ds = _train(sample["train"], seed=3, worker_count=2)
  it = iter(ds)
  first = _take(it, 2)
  state = it.get_state()
  it.close()
  it2 = iter(ds)
  it2.set_state(state)
  second = _take(it2, 2)
  it2.close()
  assert _same(first + second, ref)


def test_eval_examples(sample):
  src = sample["test"]
  examples = list(pipeline.eval_examples(src, image_size=48))
  assert [e["name"] for e in examples] == sorted(src.names())
  for i, e in enumerate(examples):
    rec = src[i]
    h, w = rec["mask"].shape
    assert e["native_size"] == (h, w)
    assert e["image"].shape == (48, 48, 3) and e["image"].dtype == np.float32
    assert e["mask"].shape == (48, 48) and set(np.unique(e["mask"])) <= {0.0, 1.0}
    np.testing.assert_array_equal(e["native_mask"], rec["mask"] // 255)
    np.testing.assert_array_equal(e["image"], pipeline.preprocess_image(rec["image"], 48))
    rows = (np.arange(48) * h / 48).astype(int)  # nearest-neighbour sampling grid
    cols = (np.arange(48) * w / 48).astype(int)
    np.testing.assert_array_equal(e["mask"], e["native_mask"][rows][:, cols])


def test_load_image_file(tmp_path):
  rgba = np.random.default_rng(0).integers(0, 256, (9, 7, 4), dtype=np.uint8)
  Image.fromarray(rgba).save(tmp_path / "a.png")
  img = pipeline.load_image_file(tmp_path / "a.png")
  assert img.dtype == np.uint8 and img.shape == (9, 7, 3)
  np.testing.assert_array_equal(img, rgba[..., :3])
  Image.fromarray(rgba[..., 0]).save(tmp_path / "g.bmp")
  np.testing.assert_array_equal(
    pipeline.load_image_file(tmp_path / "g.bmp"), np.repeat(rgba[..., :1], 3, -1)
  )
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  with pytest.raises(DataError, match="bad.jpg: cannot decode image"):
    pipeline.load_image_file(tmp_path / "bad.jpg")
  with pytest.raises(DataError, match="missing.png: image file does not exist"):
    pipeline.load_image_file(tmp_path / "missing.png")
