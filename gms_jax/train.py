"""Training the GMS latent mapper: ``gms-jax train --config configs/gms.py:busi --workdir DIR``.

:func:`train_and_evaluate` reads top to bottom in stages: workdir/logging -> mesh -> input ->
tokenizer -> model/optimizer -> shapes and shardings -> jit init -> jitted, donated, AOT-compiled
train step -> restore -> evaluator -> loop. Data parallel on a 1-D ``('data',)`` mesh: mapper
params and optimizer state are replicated, batches are sharded; the frozen tokenizer's params are
a separate, non-donated, replicated argument (under ``stop_gradient`` in the loss).

Learning-rate schedule: linear warm-up from 0 over ``schedule.warmup_epochs`` epochs, then cosine
to 0 at ``num_epochs`` (optax ``warmup_cosine_decay_schedule`` in units of epochs). With
``schedule.per_epoch=True`` (default, as the original) the LR is evaluated at the integer epoch
``step // steps_per_epoch`` and so changes once per epoch (the first epoch runs at LR 0); with
``False`` at the fractional epoch ``step / steps_per_epoch`` (changes every step).

Randomness: ``PRNGKey(config.seed)`` gives the init key and the noise key; step ``s`` uses
``fold_in(noise_key, s)``, and the data order is grain's seeded shuffle, so a resumed run
reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from gms_jax import checkpoint as ckpt_lib
from gms_jax import (
  configuration,
  errors,
  outputs,
  parallel,
  pretrained,
  recipes,
  run_metadata,
  tokenizers,
)
from gms_jax import lock as workdir_lock
from gms_jax import step as step_lib
from gms_jax.layout import LOCK_FILE

NonFiniteLossError = errors.NonFiniteLossError  # raised by the loop (check_finite)


# ----------------------------------------------------------------------------- building blocks
# (schedule, optimizer, loss settings and the step itself: gms_jax.step, the one builder that
# training, `gms-jax compile` and benchmarks/ share)


class MetricsWriter:
  """Process 0 writes metrics to TensorBoard event files and ``WORKDIR/metrics.jsonl``.

  Every JSON line carries ``wall_time`` (seconds since the epoch) for wall-clock curves
  (``gms-jax plot``)."""

  def __init__(self, workdir: str, enabled: bool):
    self._enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, ckpt_lib.TENSORBOARD_SUBDIR))
      self._jsonl = open(os.path.join(workdir, ckpt_lib.METRICS_FILE), "a", buffering=1)

  def write(self, step: int, scalars: dict[str, float], *, prefix: str = "") -> None:
    if not self._enabled:
      return
    for k, v in scalars.items():
      self._tb.add_scalar(f"{prefix}{k}", float(v), int(step))
    self._jsonl.write(
      json.dumps(
        {
          "step": int(step),
          "wall_time": round(time.time(), 3),
          **{f"{prefix}{k}": float(v) for k, v in scalars.items()},
        }
      )
      + "\n"
    )

  def keep_until(self, step: int) -> int:
    """On resume from checkpoint ``step``: removes the rows a killed run logged after it (they
    are logged again), so ``metrics.jsonl`` holds one row per step after any number of resumes.
    Returns how many rows were dropped."""
    if not self._enabled:
      return 0
    path = self._jsonl.name
    self._jsonl.close()
    with open(path, encoding="utf-8") as f:
      lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
      try:
        row_step = int(json.loads(ln).get("step", 0))
      except (ValueError, AttributeError, TypeError):
        row_step = 0  # a torn last line of a killed run: dropped below
        if ln.endswith("\n"):
          keep.append(ln)
        continue
      if row_step <= step:
        keep.append(ln)
    dropped = len(lines) - len(keep)
    if dropped:
      outputs.write_atomic(path, lambda tmp: open(tmp, "w", encoding="utf-8").writelines(keep))
    self._jsonl = open(path, "a", buffering=1)
    return dropped

  def event(self, step: int, **fields) -> None:
    if self._enabled:
      self._jsonl.write(
        json.dumps({"step": int(step), "wall_time": round(time.time(), 3), **fields}) + "\n"
      )

  def flush(self) -> None:
    if self._enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self._enabled:
      self._tb.close()
      self._jsonl.close()


def _progress(total: int, initial: int, enabled: bool):
  from tqdm import tqdm

  return tqdm(
    total=total,
    initial=initial,
    unit="step",
    dynamic_ncols=True,
    smoothing=0.1,
    disable=(not enabled) or not sys.stderr.isatty(),
  )


class _LibraryInfoFilter:
  """Drops orbax's (very chatty) INFO records from the absl log; warnings and errors pass."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "/orbax/" not in record.pathname.replace("\\", "/")


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


def check_finite(
  step: int,
  m: dict[str, np.ndarray],
  workdir: str,
  last_saved: int | None,
  precision: str = "float32",
) -> None:
  """Raises :class:`NonFiniteLossError` (naming the last good checkpoint) on a NaN/inf loss."""
  loss = float(m["loss"])
  if not math.isfinite(loss):
    where = (
      f"the last good checkpoint (step {last_saved}) is kept in {ckpt_lib.checkpoint_dir(workdir)}"
      if last_saved is not None
      else "no checkpoint had been saved yet"
    )
    raise NonFiniteLossError(
      f"non-finite training loss {loss} at step {step} (rec={float(m['rec'])}, "
      f"dice={float(m['dice'])}); training stopped and nothing after step {step - 1} was "
      f"saved; {where}. "
      + (
        "Lower the learning rate or use --config.precision=float32."
        if precision != "float32"
        else "Lower the learning rate (--config.optimizer.learning_rate); to start over with "
        "other settings, use a new --workdir (this one only resumes its own config)."
      )
    )


def window_scalars(
  window: list[dict[str, np.ndarray]], steps: int, seconds: float
) -> dict[str, float]:
  """The mean of each metric over a logging window, plus ``steps_per_sec``."""
  scalars = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
  scalars["steps_per_sec"] = steps / max(seconds, 1e-9)
  return scalars


def log_progress(
  step: int, total_steps: int, scalars: dict[str, float], last_eval: dict[str, float]
) -> None:
  """One progress line per log interval when stderr is not a terminal (no progress bar)."""
  if sys.stderr.isatty():
    return
  sec = 1.0 / max(scalars["steps_per_sec"], 1e-9)
  val = f"{last_eval['val_dice']:.4f}" if last_eval else "n/a"
  logging.info(
    "step %d/%d: loss %.4f, val Dice %s, %.2f s/step, ETA %s",
    step,
    total_steps,
    scalars["loss"],
    val,
    sec,
    _eta(sec * (total_steps - step)),
  )


def load_tokenizer(config: ml_collections.ConfigDict) -> tokenizers.Tokenizer:
  """``tokenizers.from_config``, with an unreadable/wrong weights file as one ConfigError line."""
  try:
    return tokenizers.from_config(config)
  except Exception as e:  # any loader failure names the file
    path = str(config.tokenizer.path) or "<packaged>"
    raise errors.ConfigError(
      f"config.tokenizer.path={path}: cannot load "
      f"{config.tokenizer.name} weights: {errors.describe(e)}"
    ) from e


def _eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# ----------------------------------------------------------------------------- training


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  tokenizer: tokenizers.Tokenizer | None = None,
  devices: list[jax.Device] | None = None,
) -> dict[str, Any]:
  """Trains (resuming from ``workdir`` if it holds checkpoints); returns a summary dict.

  Args:
    config: see ``configs/gms.py``.
    workdir: checkpoints, ``config.json``, ``metrics.jsonl`` and TensorBoard events go here.
    tokenizer: a ready frozen tokenizer (tests use tiny random ones); default: from the config.
    devices: the devices of the mesh (default: all devices of all processes).
  """
  # ---------------------------------------------------------------- config, workdir
  # Nothing is written before the config is validated and the workdir is known to be this run's.
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  configuration.validate(
    config,
    n_devices=len(devices or jax.devices()),
    n_processes=jax.process_count(),
    check_tokenizer=tokenizer is None,
  )
  resolve_classes(config)  # the data's classes go into the config the workdir records
  configuration.validate(  # again: what the data set (e.g. a palette of too many classes)
    config,
    n_devices=len(devices or jax.devices()),
    n_processes=jax.process_count(),
    check_tokenizer=tokenizer is None,
  )
  check_workdir(config, workdir)  # refuse another run's or a foreign folder before writing
  made_dir = not os.path.exists(workdir)
  lock = workdir_lock.WorkdirLock(workdir, "train", enabled=is_main, warn=logging.warning)
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  try:
    lock.acquire()  # one run at a time in a workdir (process 0 on a pod)
  except BaseException:
    if made_dir and is_main and not os.listdir(workdir):
      os.rmdir(workdir)
    raise
  try:
    fresh = claim_workdir(config, workdir, write=is_main)
    if fresh is not None and made_dir:
      fresh.append(workdir)
  except BaseException:
    lock.release()
    if made_dir and is_main and not os.listdir(workdir):
      os.rmdir(workdir)
    raise
  progress = {"started": False}
  try:
    return _run(config, workdir, tokenizer=tokenizer, devices=devices, progress=progress)
  except BaseException:
    lock.release()
    if fresh is not None and not progress["started"] and is_main:
      release_workdir(workdir, fresh)  # failed before its first step: leave no workdir behind
    raise
  finally:
    lock.release()


def resolve_classes(config: ml_collections.ConfigDict) -> None:
  """Sets ``config.data.num_classes`` / ``class_names`` from the data folder's ``dataset.json``
  (:mod:`gms_jax.data.labels`); a ConfigError naming the key when a set value disagrees."""
  from gms_jax.data import builder as data_builder
  from gms_jax.data import labels as labels_lib

  labels_lib.apply(config, data_builder.resolve_root(config.data.name, config.data.root))


def claim_workdir(
  config: ml_collections.ConfigDict, workdir: str, *, write: bool
) -> list[str] | None:
  """Makes ``workdir`` this run's, or raises :class:`gms_jax.errors.ConfigError`.

  A missing or empty folder becomes a new run (``config.json`` written; returns the entries
  created, for :func:`release_workdir`); a folder with ``config.json`` is resumed only when the
  config matches it (:func:`gms_jax.configuration.check_resume`; returns None); any other
  non-empty folder is refused (it is not a gms-jax workdir)."""
  config_path = os.path.join(workdir, ckpt_lib.CONFIG_FILE)
  if check_workdir(config, workdir) == "resume":
    return None
  created = [] if os.path.isdir(workdir) else [workdir]
  if write:
    os.makedirs(workdir, exist_ok=True)
    with open(config_path, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  return created


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``"new"`` (missing or empty folder) or ``"resume"`` (a run of this config); raises
  :class:`gms_jax.errors.ConfigError` for another run's workdir or a folder that is not one."""
  config_path = os.path.join(workdir, ckpt_lib.CONFIG_FILE)
  if os.path.isfile(config_path):
    try:
      with open(config_path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      raise errors.ConfigError(
        f"{config_path}: unreadable ({errors.one_line(e)}); use a new --workdir"
      ) from None
    if not isinstance(saved, dict) or not {"data", "mapper", "tokenizer"} <= set(saved):
      raise errors.ConfigError(
        f"{workdir}: not a gms-jax workdir (its {ckpt_lib.CONFIG_FILE} is not a gms-jax training "
        "config); refusing to write into it: use a new or empty --workdir"
      )
    configuration.check_resume(saved, config, workdir)
    return "resume"
  entries = set(os.listdir(workdir)) - {LOCK_FILE} if os.path.isdir(workdir) else set()
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or entries):
    raise errors.ConfigError(
      f"{workdir} exists and is not a gms-jax workdir (no {ckpt_lib.CONFIG_FILE}); refusing "
      "to write into it: use a new or empty --workdir"
    )
  return "new"


# What a run writes into its workdir before its first step (config, logs, checkpoints, bank).
RUN_ENTRIES = (
  ckpt_lib.CONFIG_FILE,
  ckpt_lib.METRICS_FILE,
  ckpt_lib.TENSORBOARD_SUBDIR,
  ckpt_lib.CHECKPOINT_SUBDIR,
  ckpt_lib.BANK_SUBDIR,
)


def release_workdir(workdir: str, created: list[str]) -> None:
  """Undoes :func:`claim_workdir` for a run that never reached its first step: removes the
  entries a run writes (:data:`RUN_ENTRIES`), then the folder itself if this run created it and
  it is empty; anything else (a file someone put there meanwhile) is left alone."""
  import shutil

  if not os.path.isdir(workdir):
    return
  for name in RUN_ENTRIES:
    path = os.path.join(workdir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
      os.remove(path)
  if workdir in created and not os.listdir(workdir):
    os.rmdir(workdir)


def _init_weights(config: ml_collections.ConfigDict, tok: tokenizers.Tokenizer, mapper_cfg):
  """``config.mapper.init``: the weights to start from (checked against the run), or None."""
  if not str(config.mapper.get("init", "") or ""):
    return None
  weights = pretrained.read_mapper(str(config.mapper.init))
  weights.check_channels(tok.latent_channels, str(config.tokenizer.name), mapper_cfg.out_channels)
  weights.check_config(mapper_cfg)
  return weights


def _run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  tokenizer: tokenizers.Tokenizer | None,
  devices: list[jax.Device] | None,
  progress: dict[str, bool],
) -> dict[str, Any]:
  """Setup, then the one loop, for either recipe (:mod:`gms_jax.recipes`)."""
  t_launch = time.time()
  # ---------------------------------------------------------------- logging
  is_main = jax.process_index() == 0
  writer = MetricsWriter(workdir, enabled=is_main)
  logging.info("host: %s", run_metadata.describe_host())
  logging.info(
    "recipe %s; workdir %s; process %d/%d; local devices %s",
    step_lib.recipe(config),
    workdir,
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )

  # ---------------------------------------------------------------- mesh
  step_lib.enable_compilation_cache(config)
  mesh = parallel.make_mesh(devices)
  n_dev = mesh.devices.size
  global_bs = parallel.check_batch_size(step_lib.global_batch_size(config, n_dev), mesh)
  eval_bs = -(-int(config.eval_batch_size) // n_dev) * n_dev
  parallel.check_batch_size(eval_bs, mesh, "eval_batch_size (rounded up to the device count)")
  logging.info(
    "mesh %s over %d devices; global batch %d (%d per process)",
    dict(mesh.shape),
    n_dev,
    global_bs,
    parallel.local_batch_size(global_bs),
  )

  # ---------------------------------------------------------------- input (splits)
  from gms_jax.data import builder, pipeline

  sources = builder.prepare(config.data)
  steps_per_epoch = pipeline.steps_per_epoch(len(sources["train"]), global_bs)

  # ---------------------------------------------------------------- frozen tokenizer
  tok = tokenizer if tokenizer is not None else load_tokenizer(config)
  logging.info("%s", tokenizers.describe(tok))

  # ---------------------------------------------------------------- every program: the builder
  built = step_lib.build(
    config, mesh, tokenizer=tok, steps_per_epoch=steps_per_epoch, global_batch=global_bs
  )
  total_steps = built.total_steps
  logging.info("classes: %s", built.classes.describe())
  logging.info(
    "mapper %s: %s params, compute dtype %s; peak LR %g; steps %s; XLA options %s",
    built.mapper_cfg,
    f"{param_count(built.abstract_state['params']):,}",
    jnp.dtype(built.dtype or jnp.float32).name,
    built.peak_lr,
    ", ".join(built.step_names),
    built.compiler_options,
  )
  logging.info(
    "data %s: train %d, validation %d, test %d (test is never used here); "
    "%d steps/epoch, %d steps (%s)",
    config.data.name,
    len(sources["train"]),
    len(sources["validation"]),
    len(sources["test"]),
    steps_per_epoch,
    total_steps,
    ", ".join(f"{n}: {built.loss_kws[n]['dice_weight']:g} x Dice" for n in built.step_names),
  )
  init_weights = _init_weights(config, tok, built.mapper_cfg)  # checked before any work

  # ---------------------------------------------------------------- recipe (the bank: fast)
  recipe = recipes.RECIPES[built.recipe](
    config, built, sources, workdir=workdir, tokenizer=tok, progress=progress
  )
  tok_params = jax.tree.map(lambda x: parallel.replicate_array(np.asarray(x), mesh), tok.params)

  # ---------------------------------------------------------------- jit init (created sharded)
  t0 = time.time()
  state = built.init()
  if init_weights is not None:
    state = step_lib.with_weights(
      state,
      jax.tree.map(
        lambda x: parallel.replicate_array(x, mesh), pretrained.nested_params(init_weights)
      ),
    )
    logging.info("mapper init from %s (sha256 %s)", init_weights.source, init_weights.sha256)
  jax.block_until_ready(state)
  logging.info("init: %.1fs", time.time() - t0)

  # ---------------------------------------------------------------- train steps (jit, donate, AOT)
  compiled: dict[str, Any] = {}

  def step_fn(name: str):
    if name not in compiled:
      t0 = time.time()
      compiled[name] = built.lower_train(name).compile()
      logging.info("train step %r compiled: %.1fs", name, time.time() - t0)
    return compiled[name]

  # ---------------------------------------------------------------- restore
  ckpt = ckpt_lib.Checkpointer(
    workdir,
    keep=int(config.keep_checkpoints),
    metadata=(
      run_metadata.RunMetadata.for_run(
        config,
        built.mapper_cfg,
        tok,
        init=None if init_weights is None else init_weights.provenance("mapper.init"),
      ).to_dict()
    ),
  )
  latest = ckpt.latest_step()
  if latest is not None:
    t0 = time.time()
    state = ckpt.restore(latest, built.abstract_state, data_iter=recipe.data_iter)
    logging.info("resumed from step %d in %s (%.1fs)", latest, ckpt.directory, time.time() - t0)
  dropped = writer.keep_until(latest or 0)  # rows an interrupted run logged past its checkpoint
  if dropped:
    logging.info(
      "metrics.jsonl: %d row(s) logged after step %d by an interrupted run removed (those "
      "steps run again)",
      dropped,
      latest or 0,
    )
  step = int(jax.device_get(state["step"]))
  step_fn(built.step_name(min(step, max(total_steps - 1, 0))))

  # ---------------------------------------------------------------- evaluator (validation only)
  validate = recipe.validator(tok_params, sources["validation"], eval_bs)
  eval_every = recipe.eval_every
  ckpt_every = recipes.every(config.checkpoint_every_steps, eval_every)
  log_every = recipes.every(config.log_every_steps, 1)
  setup_seconds = time.time() - t_launch
  writer.event(
    step,
    event="start",
    recipe=built.recipe,
    total_steps=total_steps,
    resumed=latest is not None,
    process_count=jax.process_count(),
    devices=n_dev,
    global_batch=global_bs,
    peak_lr=built.peak_lr,
    setup_seconds=round(setup_seconds, 3),
    **({"bank": recipe.info} if recipe.info else {}),
  )

  # ---------------------------------------------------------------- the loop
  logging.info(
    "training steps %d..%d: log every %d, validate every %d, checkpoint every %d",
    step + 1,
    total_steps,
    log_every,
    eval_every,
    ckpt_every,
  )
  bar = _progress(total_steps, step, is_main)
  last_saved = latest
  pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet checked on the host
  window: list[dict[str, np.ndarray]] = []
  t_window, steps_window = time.time(), 0
  last_eval: dict[str, float] = {}
  seconds = {
    "setup": setup_seconds,
    "bank": float(recipe.info.get("seconds_now", 0.0)),
    "train": 0.0,
    "validation": 0.0,
    "checkpoint": 0.0,
  }
  summary: dict[str, Any] = {
    "first_step": step + 1,
    "global_batch": global_bs,
    "peak_lr": built.peak_lr,
  }
  if recipe.info:
    summary["bank"] = recipe.info

  def drain(keep_last: bool) -> None:
    """Fetches queued metrics (all, or all but the newest), raising on a non-finite loss."""
    while len(pending) > (1 if keep_last else 0):
      s, m = pending.pop(0)
      m = jax.device_get(m)
      check_finite(s, m, workdir, last_saved, str(config.precision))
      window.append(m)
      bar.set_postfix(loss=f"{float(m['loss']):.4f}", refresh=False)

  stop = _StopSignals()
  try:
    stop.__enter__()
    t_loop = time.time()
    while step < total_steps:
      fn = step_fn(built.step_name(step))
      batch = recipe.batch(step)
      if step == summary["first_step"] - 1:
        _log_first_batch(batch)
      state, m = fn(state, tok_params, batch)
      progress["started"] = True
      step += 1
      steps_window += 1
      pending.append((step, m))
      drain(keep_last=True)  # the previous step's loss: one step of latency, no pipeline stall
      bar.update(1)

      is_last = step == total_steps
      stopping = stop.signum is not None  # SIGINT / SIGTERM: checkpoint now, then stop
      do_eval = step % eval_every == 0 or is_last
      do_ckpt = step % ckpt_every == 0 or is_last or stopping
      if step % log_every == 0 or do_eval or do_ckpt:
        drain(keep_last=False)
        scalars = window_scalars(window, steps_window, time.time() - t_window)
        scalars.update(recipe.scalars(step))
        writer.write(step, scalars, prefix="train/")
        if is_main:
          log_progress(step, total_steps, scalars, last_eval)
        summary.setdefault("losses", []).append((step, scalars["loss"]))
        window.clear()
        t_window, steps_window = time.time(), 0
      if do_eval:
        t0 = time.time()
        last_eval = validate(state["params"])
        seconds["validation"] += time.time() - t0
        writer.write(step, {**last_eval, "seconds": time.time() - t0}, prefix="eval/")
        logging.info(
          "step %d: validation Dice %.4f IoU %.4f",
          step,
          last_eval["val_dice"],
          last_eval["val_iou"],
        )
      if do_ckpt:
        t0 = time.time()
        ckpt.save(step, state, recipe.data_iter, metrics=last_eval if do_eval else None)
        last_saved = step
        seconds["checkpoint"] += time.time() - t0
      if do_eval or do_ckpt:  # steps/s and the ETA count training steps only
        t_window = time.time()
      writer.flush()
      if stopping:
        break
    seconds["train"] = time.time() - t_loop - seconds["validation"] - seconds["checkpoint"]
  finally:
    stop.__exit__()
    bar.close()
    ckpt.wait()
    writer.event(step, event="end", seconds={k: round(v, 3) for k, v in seconds.items()})
    writer.close()
  summary.update(
    step=step,
    val=last_eval,
    best_step=ckpt.best_step(),
    latest_step=ckpt.latest_step(),
    seconds=seconds,
  )
  ckpt.close()
  if stop.signum is not None:
    name = signal.Signals(stop.signum).name
    raise errors.Interrupted(
      f"interrupted by {name} at step {step} of {total_steps}: checkpoint {last_saved} saved in "
      f"{ckpt_lib.checkpoint_dir(workdir)}; run the same command to resume",
      stop.signum,
    )
  logging.info(
    "done: step %d, best checkpoint %s (validation Dice), last validation %s; wall "
    "time of this run: %s",
    step,
    summary["best_step"],
    last_eval,
    {k: round(v, 1) for k, v in seconds.items()},
  )
  return summary


class _StopSignals:
  """SIGINT / SIGTERM during the loop set a flag instead of raising where they land (a
  KeyboardInterrupt inside a JAX callback is swallowed); the loop checks it at every step
  boundary, saves a checkpoint and stops. The previous handlers come back on exit."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum is None:
      logging.warning(
        "%s received: stopping after this step with a checkpoint", signal.Signals(signum).name
      )
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)
    return False


def _log_first_batch(batch: dict[str, jax.Array]) -> None:
  """This process's rows of the first batch and the global batch (shape and mean of its first
  input): on a pod, each process can be seen feeding its own share."""
  key = "image" if "image" in batch else sorted(batch)[0]
  arr = batch[key]
  local = np.concatenate([np.asarray(s.data) for s in arr.addressable_shards])
  logging.info(
    "process %d: local batch %s (mean %.6f) -> global batch %s (mean %.6f); inputs %s",
    jax.process_index(),
    local.shape,
    float(np.mean(local)),
    arr.shape,
    float(jnp.mean(arr)),
    {k: v.shape for k, v in batch.items()},
  )


def param_count(tree: Any) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- entry point
