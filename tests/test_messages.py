"""Messages that must say the right thing (one line, the key facts, no misleading hint)."""

from __future__ import annotations

import math

import _train_helpers as H
import numpy as np
import pytest
from conftest import run_cli

from gms_jax import configuration, errors, train


def test_zero_train_steps_is_refused_not_the_default_schedule():
  config = H.load_config("smoke")
  config.num_train_steps = 0
  with pytest.raises(errors.ConfigError, match=r"config.num_train_steps must be >= 1 \(or -1\)"):
    configuration.validate(config)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_nan_message_suggests_float32_only_to_a_bfloat16_run(tmp_path, precision):
  m = {"loss": np.float32(math.nan), "rec": np.float32(1.0), "dice": np.float32(math.nan)}
  with pytest.raises(errors.NonFiniteLossError) as e:
    train.check_finite(7, m, str(tmp_path), 5, precision)
  msg = str(e.value)
  assert "step 7" in msg and "(step 5)" in msg and "\n" not in msg
  assert ("precision=float32" in msg) == (precision == "bfloat16")
  if precision == "float32":
    assert "new --workdir" in msg  # how to start over with another learning rate


def test_a_pickle_with_code_is_refused_without_torchs_hint(tmp_path):
  torch = pytest.importorskip("torch")
  evil = tmp_path / "best_model.pth"
  torch.save({"model": {"w": torch.zeros(2)}, "extra": np.dtype("float32")}, evil)
  p = run_cli("convert", "--format", "gms-mapper", evil, tmp_path / "out.safetensors")
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, lines
  assert str(evil) in lines[0] and "could run code" in lines[0]
  assert "weights_only" not in lines[0] and "will likely succeed" not in lines[0]
  assert not (tmp_path / "out.safetensors").exists()


def test_a_folder_whose_config_json_is_not_ours_is_not_a_workdir(tmp_path):
  folder = tmp_path / "mine"
  folder.mkdir()
  (folder / "config.json").write_text('{"name": "my app", "threshold": 3}')
  p = run_cli("train", "--config", "smoke", "--workdir", folder)
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert p.returncode == 2 and len(lines) == 1, lines
  assert "not a gms-jax workdir" in lines[0] and str(folder) in lines[0]
  assert len(lines[0]) < 400  # not a list of every key
  assert sorted(x.name for x in folder.iterdir()) == ["config.json"]


def test_named_datasets_need_a_root_and_validation_is_a_fraction_below_one():
  config = H.load_config("busi,taef2")
  with pytest.raises(errors.ConfigError, match=r"config.data.root is empty") as e:
    configuration.validate(config)
  assert errors.exit_code(e.value) == 2
  config = H.load_config("smoke")
  config.data.val_fraction = 1.0
  with pytest.raises(errors.ConfigError, match=r"config.data.val_fraction must be < 1") as e:
    configuration.validate(config)
  assert errors.exit_code(e.value) == 2


def test_a_truncated_safetensors_tokenizer_file_is_named_as_truncated(tmp_path):
  from gms_jax import tokenizers
  from gms_jax.convert import core

  src = tokenizers.packaged_path("taef2")
  data = open(src, "rb").read()
  cut = tmp_path / "taef2.safetensors"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(core.ConversionError, match=r"not a readable safetensors file"):
    tokenizers.load("taef2", str(cut))


@pytest.mark.slow
def test_export_pth_without_torch_and_evaluate_cache_and_out_parent(
  smoke_run, tmp_path, monkeypatch
):
  from gms_jax.cli import evaluate as evaluate_cli
  from gms_jax.cli import export as export_cli
  from gms_jax.convert import core

  workdir, _, _ = smoke_run

  def no_torch():
    raise ImportError("No module named 'torch'")

  monkeypatch.setattr(core, "torch_module", no_torch)
  with pytest.raises(
    errors.GmsError, match=r"--format pth writes a PyTorch pickle and needs torch"
  ):
    export_cli.main(["--workdir", str(workdir), str(tmp_path / "m.pth")])
  assert not (tmp_path / "m.pth").exists()
  # The dataset cache goes where --tfds-dir says.
  cache = tmp_path / "cache"
  out = tmp_path / "eval"
  assert evaluate_cli.main(["--workdir", str(workdir), "--tfds-dir", str(cache), "--out", str(out),
                            "--montage", "0", "--max-overlays", "0"]) == 0  # fmt: skip
  assert any(cache.rglob("*.array_record*")) and (out / "summary.json").is_file()
  # An --out whose parent cannot be written is named, not the hidden staging folder.
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(errors.OutputError) as e:
    evaluate_cli.main(["--workdir", str(workdir), "--out", str(blocker / "sub")])
  assert f"--out {blocker / 'sub'}: cannot write in {blocker}" in str(e.value)
  assert ".tmp-" not in str(e.value)
