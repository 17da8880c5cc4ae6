"""Helpers for the training tests: tiny configs and tokenizers, and a subprocess runner.

As a script (``python tests/_train_helpers.py SPEC.json``) it trains in a fresh process, which the
tests need for fake CPU devices (``XLA_FLAGS`` must be set before jax is imported), for
``jax.distributed`` and for killing a run with SIGKILL. SPEC keys:

* ``workdir``, ``overrides`` (dotted config keys -> values), ``tokenizer_seed``;
* ``devices``: list of device counts; one run per entry in ``workdir/<n>dev`` (default: all);
* ``kill_after_save``: SIGKILL this process right after the checkpoint of that step is committed;
* ``nan_at_step``: the images of that step's batch are NaN;
* ``distributed``: ``config.distributed`` values (then ``jax.distributed.initialize`` is called);
* ``out``: a JSON file for the summaries;
* ``compile_only``: no training: build the step (:func:`gms_jax.step.build`) on the first
  ``devices[0]`` devices, compile the train step and inference, and write their optimized HLO's
  collective counts and the resolved loss settings to ``out``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve()


def load_config(arg: str = "sample"):
  spec = importlib.util.spec_from_file_location("gms_config", REPO / "configs" / "gms.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def tiny_config(tfds_dir: str, **overrides):
  """The shipped sample at 16x16, a ch=16 mapper, 3 steps, logging every step."""
  c = load_config("sample")
  c.data.image_size = 16
  c.data.tfds_dir = str(tfds_dir)
  c.mapper.ch = 16
  c.num_train_steps = 3
  c.log_every_steps = 1
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.schedule.per_epoch = False
  c.schedule.warmup_epochs = 1
  c.eval_batch_size = 8
  apply_overrides(c, overrides)
  return c


def apply_overrides(c, overrides: dict):
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def tiny_tokenizer(seed: int = 0):
  """A tiny SD-VAE tokenizer (AutoencoderKLConfig.tiny(), /2) with seeded numpy weights.

  Filled from numpy rather than initialised by jax: no compilation, identical in every process.
  """
  from flax import nnx

  from gms_jax import tokenizers
  from gms_jax.convert import core
  from gms_jax.models.sd_vae import AutoencoderKL, AutoencoderKLConfig

  cfg = AutoencoderKLConfig.tiny()
  abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  shapes = core.flat_shapes(nnx.state(abstract, nnx.Param))
  rng = np.random.default_rng(seed)
  flat = {}
  for k, shape in sorted(shapes.items()):
    if k.endswith("kernel"):
      fan_in = int(np.prod(shape[:-1]))
      flat[k] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    elif k.endswith("scale"):
      flat[k] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      flat[k] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
  return tokenizers.from_flat("sd-vae", flat, cfg)


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_losses(workdir) -> dict[int, float]:
  """step -> train loss logged at that step (the last run's value if logged twice)."""
  out = {}
  for r in read_jsonl(Path(workdir) / "metrics.jsonl"):
    if "train/loss" in r:
      out[r["step"]] = r["train/loss"]
  return out


def params_at(workdir, which="latest") -> tuple[dict[str, np.ndarray], int]:
  from flax import nnx

  from gms_jax import run_metadata

  mapper, _, step = run_metadata.restore_mapper(str(workdir), which)
  flat = {
    "/".join(map(str, k)): np.asarray(v.get_value())
    for k, v in nnx.to_flat_state(nnx.state(mapper, nnx.Param))
  }
  return flat, step


def subprocess_env(cache_dir: str | None = None, n_devices: int | None = None) -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  # LLVM -O0: halves XLA:CPU compile time (these runs take a few steps; compile dominates).
  flags = ["--xla_backend_optimization_level=0"]
  if n_devices:
    flags.append(f"--xla_force_host_platform_device_count={n_devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  if cache_dir:  # persistent compilation cache shared by the test's subprocesses
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def launch(spec: dict, spec_path, *, env: dict) -> subprocess.Popen:
  Path(spec_path).write_text(json.dumps(spec))
  return subprocess.Popen(
    [sys.executable, str(HELPER), str(spec_path)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def run(spec: dict, spec_path, *, env: dict, timeout: float = 300) -> tuple[int, str]:
  p = launch(spec, spec_path, env=env)
  try:
    out, _ = p.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    p.kill()
    out, _ = p.communicate()
    raise AssertionError(f"subprocess timed out after {timeout}s:\n{out[-5000:]}") from None
  return p.returncode, out


# ----------------------------------------------------------------------------- subprocess side


def _main(spec_path: str) -> int:
  spec = json.loads(Path(spec_path).read_text())
  sys.modules.setdefault("torch", None)  # not needed here; tensorboardX would import it (~2 s)
  import jax
  from absl import logging

  from gms_jax import checkpoint as ckpt_lib
  from gms_jax import parallel, train

  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  train.quiet_library_logs()
  config = tiny_config(spec["tfds_dir"], **spec.get("overrides", {}))
  if spec.get("distributed"):
    apply_overrides(config, {f"distributed.{k}": v for k, v in spec["distributed"].items()})
    parallel.initialize_distributed(config.distributed)
  kill_step = spec.get("kill_after_save")
  if kill_step is not None:
    original = ckpt_lib.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
      saved = original(self, step, *args, **kwargs)
      if step == kill_step:
        self.wait()  # committed; then die without any cleanup
        print(f"KILLING after checkpoint {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      return saved

    ckpt_lib.Checkpointer.save = save_then_die
  nan_step = spec.get("nan_at_step")
  if nan_step is not None:  # poison the images of the batch of that step (a fresh run)
    original_batch, calls = parallel.global_batch, []

    def poisoned(local, mesh):
      calls.append(1)
      if len(calls) == nan_step:
        local = dict(local, image=np.full_like(local["image"], np.nan))
      return original_batch(local, mesh)

    train.parallel.global_batch = poisoned
  tok = tiny_tokenizer(spec.get("tokenizer_seed", 0))
  if spec.get("compile_only"):
    return _compile_only(spec, config, tok)
  summaries = {}
  for n in spec.get("devices") or [None]:
    workdir = spec["workdir"] if n is None else os.path.join(spec["workdir"], f"{n}dev")
    devices = None if n is None else jax.devices()[:n]
    try:
      s = train.train_and_evaluate(config, workdir, tokenizer=tok, devices=devices)
    except train.NonFiniteLossError as e:
      print("NONFINITE", e, flush=True)
      return 3
    summaries[str(n)] = {k: v for k, v in s.items() if k not in ("losses", "seconds")}
  if spec.get("out"):
    Path(spec["out"]).write_text(json.dumps(summaries))
  print(
    "PROCESS",
    jax.process_index(),
    "OF",
    jax.process_count(),
    "DONE",
    json.dumps(summaries),
    flush=True,
  )
  return 0


def _compile_only(spec: dict, config, tok) -> int:
  import re

  import jax

  from gms_jax import parallel, step

  n = (spec.get("devices") or [jax.device_count()])[0]
  built = step.build(config, parallel.make_mesh(jax.devices()[:n]), tokenizer=tok)
  size = built.image_size
  full_res = re.compile(rf"\[\d+,{size},{size}(,\d+)?\]")  # an image-sized array: the decoder's
  steps = {}
  for name in built.step_names:
    hlo = built.lower_train(name).compile().as_text()
    steps[name] = {
      "collectives": step.collective_counts(hlo),
      "full_resolution_arrays": len(full_res.findall(hlo)),
    }
  predict_hlo = built.lower_predict(built.global_batch_size).compile().as_text()
  Path(spec["out"]).write_text(
    json.dumps(
      {
        "devices": n,
        "platform": built.platform,
        "recipe": built.recipe,
        "global_batch": built.global_batch_size,
        "peak_lr": built.peak_lr,
        "loss": {k: v for k, v in built.loss_kw.items() if k.startswith("batch_")},
        "steps": steps,
        "train": steps[built.step_names[0]]["collectives"],
        "predict": step.collective_counts(predict_hlo),
      }
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1]))
