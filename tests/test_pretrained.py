"""Official GMS mapper weights end to end: import -> evaluate/predict, export -> torch, fine-tune.

The "official" checkpoint is written by the test's independent torch reference
(``torch_refs.ResAttnUNet_DS``, random weights) as ``torch.save({"model": state_dict})``, exactly
as the original GMS code saves ``best_model.pth`` (PReLU slopes under both of their names). The
tokenizer is the tiny random SD-VAE of the training tests, saved as a converted Flax file.
"""

from __future__ import annotations

import hashlib
import json
import os

import _train_helpers as H
import numpy as np
import pytest

from gms_jax import checkpoint, cli, pretrained, run_metadata, tokenizers
from gms_jax.cli import evaluate as evaluate_cli
from gms_jax.cli import export as export_cli
from gms_jax.cli import import_weights as import_cli
from gms_jax.predict import Segmenter

torch = pytest.importorskip("torch")
from gms_jax.testing import torch_refs  # noqa: E402  (needs torch)

CONFIG = str(H.REPO / "configs" / "gms.py")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("pretrained")


@pytest.fixture(scope="module")
def tok():
  return H.tiny_tokenizer(0)


@pytest.fixture(scope="module")
def tok_file(root, tok):
  path = str(root / "tiny_vae.safetensors")
  tokenizers.save(tok, path)
  return path


def _official(root, name, ch, seed):
  torch.manual_seed(seed)
  model = torch_refs.randomize_(torch_refs.ResAttnUNet_DS(4, 4, ch, (1, 2, 4, 4)), seed=seed).eval()
  path = str(root / name)
  torch.save({"model": model.state_dict()}, path)
  return model, path


@pytest.fixture(scope="module")
def official(root):
  """The GMS architecture (ch=32, 1,564,976 params), random weights, official format."""
  return _official(root, "best_model.pth", 32, 1)


def _import_args(root, tok_file, mapper, workdir, *extra):
  return [
    "--config",
    f"{CONFIG}:sample",
    "--config.data.image_size=16",
    f"--config.data.tfds_dir={root / 'tfds'}",
    "--config.tokenizer.name=sd-vae",
    f"--config.tokenizer.path={tok_file}",
    *extra,
    "--mapper",
    mapper,
    "--workdir",
    workdir,
  ]


@pytest.fixture(scope="module")
def imported(root, tok_file, official):
  workdir = str(root / "imported")
  assert import_cli.main(_import_args(root, tok_file, official[1], workdir)) == 0
  return workdir


def test_import_metadata(imported, official):
  meta = run_metadata.RunMetadata.read(checkpoint.Checkpointer(imported, read_only=True))
  with open(official[1], "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert meta.init == {
    "how": "import",
    "source": official[1],
    "format": "gms-torch",
    "sha256": digest,
  }
  assert meta.mapper.in_channels == 4 and meta.mapper.ch == 32
  assert meta.tokenizer["family"] == "sd-vae" and meta.tokenizer["latent_channels"] == 4
  assert os.listdir(os.path.join(imported, "checkpoints", "0"))  # step 0, same layout as training
  with open(os.path.join(imported, "config.json")) as f:
    assert json.load(f)["mapper"]["ch"] == 32


def test_imported_predictions_match_torch(imported, official, tok, tok_file):
  """Segmenter.from_workdir(imported) == tokenizer encode -> torch mapper -> tokenizer decode."""
  seg = Segmenter.from_workdir(imported)
  assert seg.step == 0 and seg.image_size == 16
  images = np.random.default_rng(0).uniform(size=(3, 16, 16, 3)).astype(np.float32)
  probs = seg.predict_probs(images)
  z = np.asarray(tok.encode(tok.params, images).z)
  with torch.no_grad():
    out = torch_refs.nchw_to_nhwc(official[0](torch_refs.nhwc_to_nchw(z))["out"])
  ref = np.asarray(tok.decode_mask(tok.params, out))
  np.testing.assert_allclose(probs, ref, atol=2e-5, rtol=0)
  seg2 = Segmenter.from_pretrained(official[1], tok, image_size=16)  # the Python route, no workdir
  np.testing.assert_allclose(seg2.predict_probs(images), probs, atol=1e-6, rtol=0)
  seg3 = Segmenter.from_pretrained(mapper=official[1], tokenizer=tok_file, image_size=16)  # by path
  assert seg3.tokenizer.family == "sd-vae"
  np.testing.assert_allclose(seg3.predict_probs(images), probs, atol=1e-6, rtol=0)


def test_import_then_evaluate_on_sample(imported, capsys):
  assert evaluate_cli.main(["--workdir", imported, "--montage", "0", "--max-overlays", "0"]) == 0
  with open(os.path.join(imported, "eval", "sample-test", "summary.json")) as f:
    summary = json.load(f)
  with open(H.REPO / "data" / "sample" / "split.json") as f:
    n_test = len(json.load(f)["test"])
  assert summary["checkpoint_step"] == 0 and summary["n"] == n_test
  assert summary["cpu_library_fusion"] == ""  # the workdir's config.cpu_library_fusion (off)
  assert "sample/test: n=" in capsys.readouterr().out


def test_inference_takes_the_workdirs_cpu_library_fusion_unless_told(
  imported, tmp_path, monkeypatch
):
  """Segmenter.from_workdir / evaluate: default = the run config's cpu_library_fusion, the flag
  overrides it; the probabilities agree to float32 rounding either way."""
  plain = Segmenter.from_workdir(imported)
  restore = run_metadata.restore_mapper

  def restore_fused(*args, **kwargs):  # the same workdir, as if trained with the option
    mapper, config, step = restore(*args, **kwargs)
    config.cpu_library_fusion = "dot,reduce"
    return mapper, config, step

  monkeypatch.setattr(run_metadata, "restore_mapper", restore_fused)
  fused = Segmenter.from_workdir(imported)
  assert (plain.cpu_library_fusion, fused.cpu_library_fusion) == ("", "dot,reduce")
  assert Segmenter.from_workdir(imported, cpu_library_fusion="").cpu_library_fusion == ""
  monkeypatch.undo()
  images = np.random.default_rng(1).uniform(size=(3, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(
    fused.predict_probs(images), plain.predict_probs(images), rtol=0, atol=1e-4
  )
  out = str(tmp_path / "eval")
  assert (
    evaluate_cli.main(
      [
        "--workdir",
        imported,
        "--montage",
        "0",
        "--max-overlays",
        "0",
        "--out",
        out,
        "--cpu-library-fusion",
        "reduce,dot",
      ]
    )
    == 0
  )
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f)["cpu_library_fusion"] == "reduce,dot"


def test_export_gives_back_the_official_tensors(imported, official, root):
  src = torch.load(official[1], weights_only=True)["model"]
  out = str(root / "exported.pth")
  assert export_cli.main(["--workdir", imported, out]) == 0
  got = torch.load(out, weights_only=True)
  assert set(got) == {"model"}
  got = got["model"]
  assert set(got) == set(src)  # every key, both PReLU names included
  for k in src:
    assert got[k].dtype == src[k].dtype and torch.equal(got[k], src[k]), k
  # The original architecture loads it strictly and computes what the Flax mapper computes.
  ref = torch_refs.ResAttnUNet_DS(4, 4, 32, (1, 2, 4, 4))
  ref.load_state_dict(got, strict=True)
  ref.eval()
  flax_mapper = pretrained.to_mapper(pretrained.read_mapper(imported))
  x = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch_refs.nhwc_to_nchw(x))
  have = flax_mapper(x)
  for k in ("level3", "level2", "level1", "out"):
    w = torch_refs.nchw_to_nhwc(want[k])
    rel = np.max(np.abs(np.asarray(have[k]) - w)) / np.max(np.abs(w))
    assert rel <= 1e-5, (k, rel)
  # safetensors: the same state dict, no torch needed to read it.
  from safetensors.numpy import load_file

  st = str(root / "exported.safetensors")
  assert export_cli.main(["--workdir", imported, "--format", "safetensors", st]) == 0
  arrays = load_file(st)
  assert set(arrays) == set(src)
  for k in src:
    np.testing.assert_array_equal(arrays[k], src[k].numpy(), err_msg=k)
  assert oct(os.stat(st).st_mode & 0o777) == oct(0o666 & ~_umask())
  # ... and it imports again (a torch-keyed safetensors is a valid --mapper).
  again = pretrained.read_mapper(st)
  assert again.format == "gms-torch"
  first = pretrained.read_mapper(imported)
  assert all(np.array_equal(again.flat[k], first.flat[k]) for k in first.flat)


def _umask():
  m = os.umask(0)
  os.umask(m)
  return m


def test_export_never_overwrites(imported, root, capsys):
  out = root / "taken.pth"
  out.write_bytes(b"keep me")
  assert cli.main(["export", "--workdir", imported, str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and str(out) in err
  assert out.read_bytes() == b"keep me"


def test_import_refuses_non_empty_workdir(root, tok_file, official, capsys):
  wd = root / "busy"
  wd.mkdir()
  (wd / "notes.txt").write_text("mine")
  assert cli.main(["import", *_import_args(root, tok_file, official[1], str(wd))]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and str(wd) in err and "not empty" in err
  assert os.listdir(wd) == ["notes.txt"]


def test_import_channel_mismatch_is_one_line(root, official, capsys):
  wd = root / "taef2_mismatch"
  args = ["--config", f"{CONFIG}:sample,taef2", "--mapper", official[1], "--workdir", str(wd)]
  assert cli.main(["import", *args]) == 2  # TAEF2 latents have 32 channels, the mapper 4
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert "4 -> 4 latent channels" in err and "has 32" in err and official[1] in err
  assert not wd.exists()


def test_import_missing_mapper_file(root, tok_file, capsys):
  missing = str(root / "nope.pth")
  assert cli.main(["import", *_import_args(root, tok_file, missing, str(root / "x"))]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and missing in err


# ----------------------------------------------------------------------------- fine-tuning
# Training at learning rate 1e-30 leaves the parameters exactly where they started: AdamW's update
# is lr * (m/(sqrt(v)+eps) + wd*p), at most ~1e-30 per step, far below half an ulp of any float32
# parameter here (|p| >> 1e-20), so the checkpoint after 3 steps must equal the starting weights
# bit for bit. (The config refuses a learning rate of exactly 0.)
# Both runs compile the same program (subprocess + shared persistent cache, as tests/test_train.py).


@pytest.fixture(scope="module")
def small_official(root):
  """The training tests' ch=16 mapper as the official state dict in safetensors (the training
  subprocess runs without torch)."""
  model, _ = _official(root, "small_best_model.pth", 16, 2)
  path = str(root / "small_best_model.safetensors")
  pretrained.save_official(
    {k: v.numpy() for k, v in model.state_dict().items()}, path, "safetensors"
  )
  return model, path


def _train(root, name, workdir, **overrides):
  spec = {
    "workdir": workdir,
    "tfds_dir": str(root / "tfds"),
    "overrides": {"optimizer.learning_rate": 1e-30, **overrides},
  }
  rc, out = H.run(
    spec, root / f"{name}.json", timeout=600, env=H.subprocess_env(str(root / "jax_cache"))
  )
  assert rc == 0, out[-6000:]


def _flat_of(path_or_workdir, which="best"):
  return pretrained.read_mapper(path_or_workdir, which=which).flat


def test_mapper_init_starts_from_the_file(root, small_official):
  wd = str(root / "init_run")
  _train(root, "init_run", wd, **{"mapper.init": small_official[1]})
  start = _flat_of(small_official[1])
  trained, step = H.params_at(wd, "latest")
  assert step == 3 and trained.keys() == start.keys()
  for k in start:
    np.testing.assert_array_equal(trained[k], start[k], err_msg=k)
  ckpt = checkpoint.Checkpointer(wd, read_only=True)
  init = run_metadata.RunMetadata.read(ckpt).init
  assert init["how"] == "mapper.init" and init["source"] == small_official[1]


def test_fine_tune_resumes_an_imported_workdir(root, tok, small_official):
  wd = str(root / "imported_small")
  config = H.tiny_config(str(root / "tfds"), **{"optimizer.learning_rate": 1e-30})
  pretrained.import_workdir(config, small_official[1], wd, tokenizer=tok)  # the run's own config
  _train(root, "fine_tune", wd)
  trained, step = H.params_at(wd, "latest")
  start = _flat_of(small_official[1])
  assert step == 3
  for k in start:
    np.testing.assert_array_equal(trained[k], start[k], err_msg=k)


def test_mapper_init_config_mismatch_names_the_key(root, tok, small_official):
  from gms_jax import train

  config = H.tiny_config(str(root / "tfds"), **{"mapper.ch": 32, "mapper.init": small_official[1]})
  with pytest.raises(pretrained.WeightsError, match=r"ch=32 \(weights: 16\)"):
    train.train_and_evaluate(config, str(root / "mismatch"), tokenizer=tok)
  assert not (root / "mismatch").exists()  # failed before its first step: no workdir left behind


# ----------------------------------------------------------------------------- the CLI, as a user


def _one_error_line(p, code: int) -> str:
  assert p.returncode == code, (p.returncode, p.stderr[-3000:])
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  errs = [ln for ln in p.stderr.splitlines() if ": error: " in ln]
  assert len(errs) == 1, p.stderr[-3000:]
  return errs[0]


def test_train_mapper_init_errors_are_one_line(root, official):
  """`gms-jax train --config.mapper.init=...`: a missing file is refused before any work; a mapper
  of 4 channels against TAEF2's 32 latent channels is one line, and no workdir is left behind."""
  from conftest import REPO, run_cli

  smoke = f"{REPO / 'configs' / 'gms.py'}:smoke"
  wd = root / "cli_init"
  p = run_cli(
    "train", "--config", smoke, "--workdir", wd, "--config.mapper.init=/no/such/best_model.pth"
  )
  assert "config.mapper.init=/no/such/best_model.pth" in _one_error_line(p, 2)
  assert not wd.exists()
  p = run_cli(
    "train",
    "--config",
    smoke,
    "--workdir",
    wd,
    f"--config.data.tfds_dir={root / 'tfds'}",
    f"--config.mapper.init={official[1]}",
  )
  line = _one_error_line(p, 2)
  assert official[1] in line and "4 -> 4 latent channels" in line and "has 32" in line, line
  assert not wd.exists()


@pytest.mark.parametrize(
  "args,names",
  [
    (
      ["--config", f"{CONFIG}:sample", "--config.mapper.chh=3"],
      ["config.mapper.chh", "config.mapper.ch"],
    ),
    (["--config", "no/such/config.py:sample"], ["no/such/config.py"]),
    (["--config", f"{CONFIG}:bogus"], ["bogus", "unknown dataset"]),
    (["--config", f"{CONFIG}:sample"], ["config.tokenizer.path"]),  # sd-vae has no packaged weights
    (["--config", f"{CONFIG}:sample,taef2", "--config.batch_size=0"], ["config.batch_size"]),
  ],
)
def test_import_config_errors_are_one_line(root, official, args, names, capsys):
  wd = root / "never"
  assert cli.main(["import", *args, "--mapper", official[1], "--workdir", str(wd)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert all(n in err for n in names), err
  assert not wd.exists()


def test_every_mapper_source_reads_the_same_weights(root, official, imported):
  """best_model.pth, its `gms-jax convert` output and the imported workdir hold the same params."""
  from gms_jax.cli import convert

  converted = str(root / "mapper_converted.safetensors")
  assert convert.main(["--format", "gms-mapper", official[1], converted]) == 0
  ref = pretrained.read_mapper(official[1])
  for src, fmt in ((converted, "gms-jax-convert"), (imported, "gms-jax-workdir")):
    got = pretrained.read_mapper(src)
    assert got.format == fmt and got.cfg == ref.cfg
    assert sorted(got.flat) == sorted(ref.flat)
    assert all(np.array_equal(got.flat[k], ref.flat[k]) for k in ref.flat), src
  assert ref.sha256 == hashlib.sha256(open(official[1], "rb").read()).hexdigest()


def test_evaluate_tta_writes_beside_the_plain_evaluation(imported, capsys):
  """--tta goes to its own default folder (eval/<dataset>-<split>-tta-<views>): the METHOD §4
  evaluation of the same workdir is never replaced."""
  plain = os.path.join(imported, "eval", "sample-test")
  assert evaluate_cli.main(["--workdir", imported, "--montage", "0", "--max-overlays", "0"]) == 0
  before = open(os.path.join(plain, "summary.json")).read()
  assert (
    evaluate_cli.main(
      ["--workdir", imported, "--montage", "0", "--max-overlays", "0", "--tta", "flip"]
    )
    == 0
  )
  assert open(os.path.join(plain, "summary.json")).read() == before
  with open(os.path.join(imported, "eval", "sample-test-tta-flip", "summary.json")) as f:
    tta = json.load(f)
  assert tta["tta"] == "flip" and json.loads(before)["tta"] == "none"
  assert tta["cpu_library_fusion"] == "" and json.loads(before)["cpu_library_fusion"] == ""
  assert tta["n"] == json.loads(before)["n"]
  assert "sample/test-tta-flip: n=" in capsys.readouterr().out
