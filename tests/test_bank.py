"""The latent bank and the fast recipe's loss (gms_jax/bank.py, gms_jax/loss.banked_loss).

The shipped sample (29 training pairs) at 16x16 with a tiny random SD-VAE tokenizer (/2, 4
latent channels, a posterior, so the std*eps noise is exercised). Builds that must be
independent processes (SIGKILL) run through tests/_bank_helpers.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import _bank_helpers as BH
import _train_helpers as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gms_jax import bank as bank_lib
from gms_jax import loss as loss_lib
from gms_jax.models.latent_mapper import MapperConfig, ResAttnUNet_DS

S, K, SHARD = 16, 2, 8  # 29 records -> 4 blocks per view, 8 shards


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("bank")
  return {"root": root, "tfds": str(root / "tfds"), "cache": str(root / "jax_cache")}


def _spec(dirs, name, **kw):
  spec = {
    "tfds_dir": dirs["tfds"],
    "bank_dir": str(dirs["root"] / name),
    "seed": 7,
    "num_views": K,
    "shard_size": SHARD,
    "image_size": S,
    "tokenizer_seed": 0,
  }
  spec.update(kw)
  return spec


def _build_subprocess(dirs, spec, timeout=300):
  path = Path(spec["bank_dir"] + ".json")
  path.write_text(json.dumps(spec))
  env = H.subprocess_env(dirs["cache"])
  env["PYTHONPATH"] = f"{H.REPO / 'tests'}:{env['PYTHONPATH']}"
  p = subprocess.run(
    [sys.executable, str(H.REPO / "tests" / "_bank_helpers.py"), str(path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  return p.returncode, p.stdout + p.stderr


def _arrays(bank_dir):
  b = bank_lib.Bank(bank_dir)
  return b, b.arrays


@pytest.fixture(scope="module")
def reference(dirs):
  """An uninterrupted build, seed 7."""
  spec = _spec(dirs, "reference")
  rc, out = _build_subprocess(dirs, spec)
  assert rc == 0, out[-4000:]
  return spec["bank_dir"]


@pytest.fixture(scope="module")
def source(dirs, reference):
  from gms_jax.data import builder

  return builder.prepare({"name": "sample", "tfds_dir": dirs["tfds"]})["train"]


def test_bank_layout_and_manifest(reference, source):
  b, arrays = _arrays(reference)
  n = len(source)
  assert b.num_records == n and b.num_views == K and b.num_entries == K * n
  assert arrays["z_image"].shape == (K * n, S // 2, S // 2, 4) == arrays["z_mask"].shape
  assert arrays["std_image"].shape == arrays["z_image"].shape and np.all(arrays["std_image"] > 0)
  assert arrays["mask_bits"].shape == (K * n, S * S // 8)
  m = b.manifest
  assert m["split"]["names_sha256"] == bank_lib.names_sha256(source.names())
  assert m["image_size"] == S and m["seed"] == 7 and m["num_views"] == K and m["has_std"]
  assert len(list((Path(reference) / "shards").iterdir())) == K * -(-n // SHARD)
  assert b.build_seconds > 0 and bank_lib.disk_bytes(reference) > arrays["z_image"].nbytes
  views, records = np.array([1, 0, 1, 1]), np.array([0, 9, 16, n - 1])  # across blocks and views
  got = b.gather(views, records, masks=True)
  for key in ("z_image", "std_image", "z_mask"):
    np.testing.assert_array_equal(got[key], arrays[key][views * n + records])
  np.testing.assert_array_equal(
    got["mask"], bank_lib.unpack_masks(arrays["mask_bits"][views * n + records], S)
  )


def _view(source, seed, i, k, extras=()):
  """View k of record i written out from the definition: the docs/METHOD.md §3 Augmenter (with the
  optional extras) drawing from default_rng(SeedSequence([seed, i, k]))."""
  from gms_jax.data import augment

  rec = source[i]
  rng = np.random.default_rng(np.random.SeedSequence([seed, i, k]))
  return augment.Augmenter(S, augment=True, extras=extras)(rec["image"], rec["mask"], rng)


def test_views_reproducible_and_seeded(dirs, reference, source):
  """View k of image i is the same in a second build with the same seed (built with another
  shard size and encoder batch, i.e. another build order) and differs with another seed."""
  same = _spec(dirs, "same_seed", shard_size=5, encode_batch_size=4)
  other = _spec(dirs, "other_seed", seed=8)
  for spec in (same, other):
    rc, out = _build_subprocess(dirs, spec)
    assert rc == 0, out[-4000:]
  _, a = _arrays(reference)
  _, b = _arrays(same["bank_dir"])
  _, c = _arrays(other["bank_dir"])
  for key in ("z_image", "std_image", "z_mask", "mask_bits"):
    np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)
  n = len(source)
  differ = [not np.allclose(a["z_image"][e], c["z_image"][e]) for e in range(K * n)]
  assert sum(differ) > K * n // 2  # unaugmented draws (p ~ .06 each) may coincide
  # the stored masks are the views' masks, written out independently
  for i, k in [(0, 0), (3, 1), (n - 1, 1)]:
    _, mask = _view(source, 7, i, k)
    got = bank_lib.unpack_masks(a["mask_bits"][[k * n + i]], S)[0]
    np.testing.assert_array_equal(got, mask)
  # and view k of image i changes with k (a per-view draw, not a per-image one)
  assert sum(not np.allclose(a["z_image"][i], a["z_image"][n + i]) for i in range(n)) > n // 2


def test_sigkill_mid_build_then_resume_equals_uninterrupted(dirs, reference):
  spec = _spec(dirs, "killed", kill_at_save=5 * 3 + 3)  # 4th shard, its 3rd array (5 per shard)
  rc, out = _build_subprocess(dirs, spec)
  assert rc == -9 and "KILLING" in out, out[-3000:]
  shards = Path(spec["bank_dir"]) / "shards"
  done = sorted(p.name for p in shards.iterdir() if not p.name.startswith("."))
  assert done == ["v0000-b0000", "v0000-b0001", "v0000-b0002"]
  assert (shards / ".tmp-v0000-b0003").is_dir()  # the half-written shard is not taken as done
  with pytest.raises(bank_lib.DataError, match="incomplete"):
    bank_lib.Bank(spec["bank_dir"])
  before = {p.name: p.stat().st_mtime_ns for p in shards.iterdir() if not p.name.startswith(".")}
  spec.pop("kill_at_save")
  rc, out = _build_subprocess(dirs, spec)
  assert rc == 0, out[-4000:]
  assert '"built": 5' in out  # only the missing shards were encoded
  after = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
  assert all(after[k] == v for k, v in before.items())  # finished shards kept untouched
  assert not any(name.startswith(".tmp") for name in after)
  _, a = _arrays(reference)
  _, b = _arrays(spec["bank_dir"])
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)


def test_two_processes_build_their_shares_of_the_same_bank(dirs, reference):
  """On a pod each process builds shards j % process_count == process_index into one folder;
  two such processes running at once give the single-process bank."""
  env = H.subprocess_env(dirs["cache"])
  env["PYTHONPATH"] = f"{H.REPO / 'tests'}:{env['PYTHONPATH']}"
  procs = []
  for i in range(2):
    spec = _spec(dirs, "pod", process_index=i, process_count=2)
    path = dirs["root"] / f"pod{i}.json"
    path.write_text(json.dumps(spec))
    procs.append(
      subprocess.Popen(
        [sys.executable, str(H.REPO / "tests" / "_bank_helpers.py"), str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
  assert all('"built": 4' in o for o in outs), outs  # 8 shards, 4 each
  _, a = _arrays(reference)
  _, b = _arrays(spec["bank_dir"])
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)


def test_mismatched_bank_refused_with_one_line(dirs, reference, source):
  tok = H.tiny_tokenizer(0)
  good = BH.manifest_for(_spec(dirs, "x"), source, tok)
  bank_lib.prepare_manifest(reference, good, write=False)  # the same run: accepted
  cases = {
    "tokenizer.params_sha256": BH.manifest_for(_spec(dirs, "x"), source, H.tiny_tokenizer(1)),
    "image_size": dict(good, image_size=32),
    "split.names_sha256": dict(good, split=dict(good["split"], names_sha256="0" * 64)),
    "seed": dict(good, seed=8),
    "augmentation": BH.manifest_for(_spec(dirs, "x", extras=["intensity"]), source, tok),
  }
  scanner = BH.manifest_for(_spec(dirs, "x", extras=["intensity", "scanner"]), source, tok)
  for key, expected in [*cases.items(), ("augmentation", scanner)]:
    with pytest.raises(bank_lib.BankMismatchError) as e:
      bank_lib.prepare_manifest(reference, expected)
    msg = str(e.value)
    assert "\n" not in msg and key in msg and str(Path(reference) / "manifest.json") in msg, msg
  # a folder that is not a bank (here: shards whose manifest is gone) is never written into
  from gms_jax import errors

  orphan = Path(reference).parent / "orphan"
  (orphan / "shards").mkdir(parents=True)
  with pytest.raises(errors.OutputError, match="not a latent bank"):
    bank_lib.prepare_manifest(orphan, good)
  assert not (orphan / "manifest.json").exists()
  # more views than built: accepted (views are independent), and the manifest records K
  grown = bank_lib.prepare_manifest(reference, dict(good, num_views=K + 1), write=False)
  assert grown["num_views"] == K + 1


@pytest.mark.parametrize("scanner", [False, True], ids=["intensity", "intensity+scanner"])
def test_intensity_bank_holds_the_intensity_views(dirs, reference, source, scanner):
  """bank.intensity_augment (and bank.scanner_augment): the manifest names them, and view k of
  image i is the encoding of the Augmenter(extras=("intensity", ["scanner"])) view drawn from
  (seed, i, k), not the docs/METHOD.md §3 one."""
  from gms_jax import recipes

  extras = ["intensity", "scanner"] if scanner else ["intensity"]
  spec = _spec(dirs, "-".join(extras), extras=extras)
  rc, out = _build_subprocess(dirs, spec)
  assert rc == 0, out[-4000:]
  b, a = _arrays(spec["bank_dir"])
  # the manifest strings of banks built before the extras were a tuple (format kept)
  assert b.manifest["augmentation"] == (
    "spec3-albumentations-v1+intensity-v1" + ("+scanner-v1" if scanner else "")
  )
  assert bank_lib.augmentation_extras(b.manifest["augmentation"]) == tuple(extras)
  assert bank_lib.Bank(reference).manifest["augmentation"] == "spec3-albumentations-v1"
  n = len(source)
  entries = [(0, 0), (5, 1), (n - 1, 1), (12, 0)]
  imgs, masks = zip(*[_view(source, 7, i, k, extras=extras) for i, k in entries])
  plain = [_view(source, 7, i, k)[0] for i, k in entries]
  assert any(not np.allclose(x, y) for x, y in zip(imgs, plain))
  enc = recipes.make_encode_fn(H.tiny_tokenizer(0), jax.local_devices()[:1])(
    np.stack(imgs), np.stack(masks)
  )
  rows = [k * n + i for i, k in entries]
  for key in ("z_image", "std_image", "z_mask"):
    np.testing.assert_allclose(a[key][rows], enc[key], rtol=0, atol=1e-5, err_msg=key)
  np.testing.assert_array_equal(bank_lib.unpack_masks(a["mask_bits"][rows], S), np.stack(masks))
  _, ref = _arrays(reference)
  assert not np.allclose(a["z_image"], ref["z_image"])


def test_banked_loss_equals_exact_loss_on_the_same_views(reference, source):
  """The fast loss on a banked batch == gms_loss on the same augmented images through the
  encoder: latent term (phase 1) and, with the stored masks, the Dice term (phase 2)."""
  tok = H.tiny_tokenizer(0)
  b = bank_lib.Bank(reference)
  n = len(source)
  views, records = np.array([0, 1, 1, 0]), np.array([2, 2, 17, n - 1])
  imgs, masks = zip(*[_view(source, 7, i, k) for i, k in zip(records, views)])
  images, masks = np.stack(imgs), np.stack(masks)
  mapper = ResAttnUNet_DS(MapperConfig(ch=16), rngs=nnx.Rngs(3))
  graphdef, state = nnx.split(mapper, nnx.Param)
  params = nnx.to_pure_dict(state)
  eps = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (4, S // 2, S // 2, 4)))

  @jax.jit
  def both(params, tp, images, masks, batch, apply):
    exact = loss_lib.gms_loss(graphdef, params, tok, tp, images, masks, apply_noise=apply, eps=eps)
    banked = loss_lib.banked_loss(
      graphdef, params, tok, tp, batch, apply_noise=apply, eps=eps, dice_weight=1.0
    )
    rec_only = loss_lib.banked_loss(graphdef, params, tok, tp, batch, apply_noise=apply, eps=eps)
    return exact, banked, rec_only

  batch = b.gather(views, records, masks=True)
  np.testing.assert_array_equal(batch["mask"], masks)
  for apply in (True, False):
    (l_ex, t_ex), (l_b, t_b), (l_r, t_r) = both(
      params, tok.params, images, masks, batch, jnp.asarray(apply)
    )
    print(
      f"\n[banked noise={apply}] exact rec {float(t_ex['rec']):.7f} dice "
      f"{float(t_ex['dice']):.7f}; banked rec {float(t_b['rec']):.7f} dice "
      f"{float(t_b['dice']):.7f}"
    )
    assert float(t_ex["rec"]) > 1e-3
    assert abs(float(t_r["rec"]) - float(t_ex["rec"])) <= 1e-5
    assert float(l_r) == pytest.approx(float(t_r["rec"]), abs=1e-7)  # phase 1: latent term only
    assert abs(float(t_b["dice"]) - float(t_ex["dice"])) <= 1e-5
    assert abs(float(l_b) - float(l_ex)) <= 1e-5
  # the noise matters here (the tiny VAE has a posterior std), so the test can see it
  _, (_, t_noisy), _ = both(params, tok.params, images, masks, batch, jnp.asarray(True))
  _, (_, t_clean), _ = both(params, tok.params, images, masks, batch, jnp.asarray(False))
  assert abs(float(t_noisy["rec"]) - float(t_clean["rec"])) > 1e-4


def test_batch_entries_order():
  n, k, bs, seed = 29, 3, 8, 1
  spe = n // bs
  seen = {}
  for step in range(spe * k * 2):
    v, r = bank_lib.batch_entries(step, num_records=n, num_views=k, batch_size=bs, seed=seed)
    assert len(set(r.tolist())) == bs
    for vi, ri in zip(v, r):
      seen.setdefault(step // spe, []).append((int(vi), int(ri)))
  for cycle in range(2):  # within K epochs a record never shows the same view twice
    pairs = [p for e in range(cycle * k, (cycle + 1) * k) for p in seen[e]]
    assert len(pairs) == len(set(pairs))
  v2, r2 = bank_lib.batch_entries(5, num_records=n, num_views=k, batch_size=bs, seed=seed)
  v3, r3 = bank_lib.batch_entries(5, num_records=n, num_views=k, batch_size=bs, seed=seed)
  assert np.array_equal(v2, v3) and np.array_equal(r2, r3)  # a function of the step only


def test_mask_bits_roundtrip():
  rng = np.random.default_rng(0)
  m = (rng.uniform(size=(3, 13, 13)) > 0.5).astype(np.float32)  # 169 bits: not a byte multiple
  np.testing.assert_array_equal(bank_lib.unpack_masks(bank_lib.pack_masks(m), 13), m)
