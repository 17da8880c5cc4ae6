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
