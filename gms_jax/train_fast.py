"""The ``fast`` recipe: the latent mapper trained on a latent bank (``configs/gms.py:busi,taef2,fast``).

``gms_jax.train.train_and_evaluate`` validates the config, claims the workdir and then hands a
config with ``recipe = "fast"`` to :func:`run` here. The stages mirror ``gms_jax/train.py`` and
reuse its public pieces (``make_schedule``, ``make_optimizer``, ``loss_kwargs``,
``load_tokenizer``, ``MetricsWriter``, the checkpointer and its run metadata), with two
differences:

* a **latent-bank stage** after the tokenizer: K augmented views of every training pair are
  encoded once by the frozen encoder into ``bank.dir`` (default ``WORKDIR/bank``;
  :mod:`gms_jax.bank`: atomic shards, resumable, reused across restarts, refused when built for
  another tokenizer, image size, split or seed);
* the **banked step** (:func:`make_banked_step`): :func:`gms_jax.loss.banked_train_loss` on
  stored latents. Phase 1 (``num_epochs`` epochs, or ``num_train_steps`` steps, with the
  configured warm-up + cosine schedule) is the latent term only and never runs the tokenizer;
  phase 2 (``fast.dice_steps`` more steps at the constant ``fast.dice_learning_rate``, see
  :func:`make_fast_schedule`) adds the decoder Dice term against the view's stored mask (the
  SPEC §3 loss without the encoder). Only the mapper's params are differentiated.

The data order is a pure function of the step (:func:`gms_jax.bank.batch_entries`), so a
resumed run reads the same batches as an uninterrupted one with no iterator state to save.
Validation (model selection) is on the validation split with the SPEC §4 protocol; its images
are encoded once and only the mapper and decoder run at each validation.

Every deviation from SPEC §3 is listed in the ``configs/gms.py`` docstring.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from gms_jax import bank as bank_lib
from gms_jax import checkpoint as ckpt_lib
from gms_jax import inference
from gms_jax import loss as loss_lib
from gms_jax import metrics as metrics_lib
from gms_jax import parallel
from gms_jax import pretrained
from gms_jax import run_metadata
from gms_jax import step as step_lib
from gms_jax import tokenizers
from gms_jax import train as train_lib
from gms_jax.models import latent_mapper
from gms_jax.models.latent_mapper import MapperConfig


def make_fast_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                       phase1_steps: int) -> Callable:
  """Phase 1: ``gms_jax.step.make_schedule`` (warm-up + cosine to 0 at ``num_epochs``); from
  step ``phase1_steps`` on (phase 2) the constant ``fast.dice_learning_rate``."""
  base = step_lib.make_schedule(config, steps_per_epoch)
  dice_lr = float(config.fast.dice_learning_rate)

  def schedule(count):
    count = jnp.asarray(count)
    return jnp.where(count < phase1_steps, base(count), jnp.float32(dice_lr))

  return schedule


def banked_loss_kwargs(config: ml_collections.ConfigDict, *, dice: bool,
                       platform: str | None = None) -> dict[str, Any]:
  """``config.loss`` as :func:`gms_jax.loss.banked_train_loss` keywords; ``dice=False`` = phase 1."""
  kw = step_lib.loss_kwargs(config, platform)
  kw.pop("batch_encode")
  kw["dice_weight"] = kw["dice_weight"] if dice else 0.0
  return kw


def ema_decay_at(decay: float, step):
  """The EMA decay at optimizer step ``step`` (0-based): ``min(decay, (1 + s) / (10 + s))``, so
  the average forgets the random init quickly."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def make_banked_step(graphdef: Any, tokenizer: tokenizers.Tokenizer,
                     tx: optax.GradientTransformation, schedule: Callable,
                     loss_kw: dict[str, Any], ema_decay: float = 0.0) -> Callable:
  """The (un-jitted) step ``(state, tok_params, banked batch) -> (state, metrics)``.

  Same state and metrics as ``gms_jax.step.make_train_step``; step ``s`` draws its latent noise
  from ``fold_in(rng, s)``. With ``ema_decay > 0`` the optimizer's weights are
  ``state["train_params"]`` and ``state["params"]`` is their exponential moving average (what
  validation selects and ``gms-jax evaluate`` / ``predict`` load); only ``train_params`` is
  differentiated.
  """
  ema = float(ema_decay) > 0.0

  def train_step(state, tok_params, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    weights = state["train_params"] if ema else state["params"]

    def loss_fn(params):
      return loss_lib.banked_train_loss(graphdef, params, tokenizer, tok_params, batch, rng,
                                        **loss_kw)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(weights)
    updates, opt_state = tx.update(grads, state["opt_state"], weights)
    weights = optax.apply_updates(weights, updates)
    new_state = {"step": state["step"] + 1, "params": weights, "opt_state": opt_state,
                 "rng": state["rng"]}
    if ema:
      d = ema_decay_at(ema_decay, state["step"])
      new_state["train_params"] = weights
      new_state["params"] = jax.tree.map(lambda e, w: d * e + (1.0 - d) * w, state["params"],
                                         weights)
    metrics = {"loss": loss, **terms, "lr": schedule(state["step"]),
               "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  return train_step


def banked_batch_shapes(global_bs: int, latent_shape, image_size: int, *, has_std: bool,
                        dice: bool, sharding=None) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a banked batch (what :meth:`gms_jax.bank.Bank.gather` returns)."""
  z = jax.ShapeDtypeStruct((global_bs, *latent_shape), jnp.float32, sharding=sharding)
  shapes = {"z_image": z, "z_mask": z}
  if has_std:
    shapes["std_image"] = z
  if dice:
    shapes["mask"] = jax.ShapeDtypeStruct((global_bs, image_size, image_size), jnp.float32,
                                          sharding=sharding)
  return shapes


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def tokenizer_identity(config: ml_collections.ConfigDict, tok: tokenizers.Tokenizer) -> dict:
  return {"name": str(config.tokenizer.name), "path": str(config.tokenizer.path),
          "family": tok.family, "latent_channels": int(tok.latent_channels),
          "params_sha256": bank_lib.params_sha256(tok.params)}


def make_encode_fn(tok: tokenizers.Tokenizer, devices: list[jax.Device],
                   compiler_options: dict[str, str] | None = None) -> Callable:
  """A jitted ``(images, masks) -> {"z_image", "std_image", "z_mask"}`` (numpy) over ``devices``
  (this process's devices: each process encodes its own shards); ``compiler_options``: XLA's
  (:func:`gms_jax.step.compiler_options`)."""
  mesh = parallel.make_mesh(devices)
  shard = parallel.data_sharded(mesh)
  tok_params = jax.tree.map(lambda x: jax.device_put(np.asarray(x), parallel.replicated(mesh)),
                            tok.params)

  @functools.partial(jax.jit, compiler_options=compiler_options)
  def encode(tp, images, masks):
    lat = tok.encode(tp, images)
    z_mask = tok.encode(tp, jnp.repeat(masks[..., None], 3, axis=-1)).z
    return {"z_image": lat.z, "std_image": lat.std, "z_mask": z_mask}

  def encode_fn(images, masks):
    out = encode(tok_params, jax.device_put(np.asarray(images, np.float32), shard),
                 jax.device_put(np.asarray(masks, np.float32), shard))
    return {k: np.asarray(v) for k, v in out.items()}

  return encode_fn


def bank_extras(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The optional view extras a config turns on: ``bank.<name>_augment`` for each name in
  ``gms_jax.data.augment.EXTRAS`` (absent keys, from configs older than the option, are off)."""
  from gms_jax.data import augment as aug_lib  # pylint: disable=import-outside-toplevel
  return tuple(n for n in aug_lib.EXTRAS if bool(config.bank.get(f"{n}_augment", False)))


def prepare_bank(config: ml_collections.ConfigDict, workdir: str, train_source,
                 tok: tokenizers.Tokenizer, local_devices: list[jax.Device], *,
                 progress: dict[str, bool] | None = None,
                 compiler_options: dict[str, str] | None = None
                 ) -> tuple[bank_lib.Bank, dict[str, Any]]:
  """Checks or writes the manifest, builds the missing shards (this process's), opens the bank
  (the encoder compiled with ``compiler_options``: the run's :func:`gms_jax.step.compiler_options`).

  A bank built for another tokenizer, image size, split or seed raises
  :class:`gms_jax.bank.BankMismatchError` (one line) before anything is written."""
  size = int(config.data.image_size)
  f = tok.downsample
  if size % f:
    raise ValueError(f"config.data.image_size={size} is not a multiple of {f}")
  bank_dir = os.path.abspath(str(config.bank.dir) or os.path.join(workdir, ckpt_lib.BANK_SUBDIR))
  k = int(config.bank.num_views)
  if k < 1:
    raise ValueError(f"config.bank.num_views must be >= 1, got {k}")
  n_local = len(local_devices)
  ebs = -(-int(config.bank.encode_batch_size) // n_local) * n_local
  expected = bank_lib.make_manifest(
      tokenizer=tokenizer_identity(config, tok), precision=str(config.precision),
      image_size=size, source=train_source, seed=int(config.bank.seed), num_views=k,
      shard_size=int(config.bank.shard_size), has_std=tok.has_posterior,
      latent_shape=(size // f, size // f, tok.latent_channels),
      augment=bool(config.data.augment),
      extras=bank_extras(config))
  if jax.process_index() == 0:
    manifest = bank_lib.prepare_manifest(bank_dir, expected, write=True)
  _sync("gms_bank_manifest")
  if jax.process_index() != 0:
    manifest = bank_lib.prepare_manifest(bank_dir, expected, write=False)
  manifest = dict(manifest, num_views=k)  # build (and read) the views this run uses
  if progress is not None:
    progress["started"] = True  # from here on the workdir holds work worth keeping
  t0 = time.time()
  stats = bank_lib.build(bank_dir, train_source, manifest, make_encode_fn(
      tok, local_devices, compiler_options),
                         encode_batch_size=ebs, process_index=jax.process_index(),
                         process_count=jax.process_count(),
                         log=lambda s: logging.info("%s", s))
  _sync("gms_bank_built")
  bank = bank_lib.Bank(bank_dir, num_views=k)
  info = {"dir": bank_dir, "views": k, "records": bank.num_records, "entries": bank.num_entries,
          "bytes": bank_lib.disk_bytes(bank_dir), "build_seconds_total": bank.build_seconds,
          "built_now": stats["built"], "seconds_now": time.time() - t0,
          "seconds_per_view": bank.build_seconds / max(bank.num_entries, 1)}
  logging.info("latent bank %s: %d views x %d records, %.1f MiB on disk, built in %.1fs in all "
               "(%.3f s/view); this run built %d shard(s) in %.1fs", bank_dir, k,
               bank.num_records, info["bytes"] / 2**20, bank.build_seconds,
               info["seconds_per_view"], stats["built"], info["seconds_now"])
  return bank, info


def run(config: ml_collections.ConfigDict, workdir: str, *,
        tokenizer: tokenizers.Tokenizer | None, devices: list[jax.Device] | None,
        progress: dict[str, bool]) -> dict[str, Any]:
  """Trains the ``fast`` recipe in a workdir that ``gms_jax.train.train_and_evaluate`` has
  validated and claimed (resuming from its checkpoints); returns a summary dict.

  ``progress["started"]`` is set once the latent bank starts being written, so that a run
  interrupted during the (long) bank build keeps its finished shards for the next start instead
  of having its new workdir removed as one that never began.
  """
  t_launch = time.time()
  # ---------------------------------------------------------------- logging
  is_main = jax.process_index() == 0
  writer = train_lib.MetricsWriter(workdir, enabled=is_main)
  logging.info("host: %s", run_metadata.describe_host())
  logging.info("fast recipe (latent bank); workdir %s; process %d/%d; local devices %s", workdir,
               jax.process_index(), jax.process_count(), jax.local_devices())

  # ---------------------------------------------------------------- mesh
  mesh = parallel.make_mesh(devices)
  opts = step_lib.compiler_options(config, step_lib.mesh_platform(mesh))
  if opts:
    logging.info("XLA compiler options (config.cpu_library_fusion): %s", opts)
  global_bs = parallel.check_batch_size(int(config.batch_size), mesh)
  n_dev = mesh.devices.size
  eval_bs = -(-int(config.eval_batch_size) // n_dev) * n_dev
  repl = parallel.replicated(mesh)
  data_sharding = parallel.data_sharded(mesh)
  local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]

  # ---------------------------------------------------------------- input
  from gms_jax.data import builder, pipeline  # pylint: disable=import-outside-toplevel
  sources = builder.prepare(config.data)
  image_size = int(config.data.image_size)
  n_train = len(sources["train"])
  steps_per_epoch = pipeline.steps_per_epoch(n_train, global_bs)
  phase1_steps = (int(config.num_train_steps) if int(config.num_train_steps) > 0
                  else int(config.num_epochs) * steps_per_epoch)
  dice_steps = max(int(config.fast.dice_steps), 0)
  total_steps = phase2_start = phase1_steps
  total_steps += dice_steps
  eval_every = (int(config.eval_every_steps) if int(config.eval_every_steps) > 0
                else max(int(config.fast.eval_every_epochs), 1) * steps_per_epoch)
  ckpt_every = (int(config.checkpoint_every_steps) if int(config.checkpoint_every_steps) > 0
                else eval_every)
  log_every = max(int(config.log_every_steps), 1)
  logging.info("data %s: train %d, validation %d; %d steps/epoch, %d steps (phase 2 with the "
               "Dice term from step %d)", config.data.name, n_train, len(sources["validation"]),
               steps_per_epoch, total_steps, phase2_start + 1)

  # ---------------------------------------------------------------- frozen tokenizer
  tok = tokenizer if tokenizer is not None else train_lib.load_tokenizer(config)
  logging.info("%s", tokenizers.describe(tok))

  # ---------------------------------------------------------------- mapper (checked before the bank)
  dtype = ckpt_lib.compute_dtype(config.precision)
  mapper_cfg = MapperConfig(in_channels=tok.latent_channels, out_channels=tok.latent_channels,
                            ch=int(config.mapper.ch), ch_mult=tuple(config.mapper.ch_mult))
  graphdef, _ = nnx.split(latent_mapper.abstract(mapper_cfg, dtype), nnx.Param)
  init_weights = None  # config.mapper.init: start from these weights (as gms_jax/train.py)
  if str(config.mapper.get("init", "") or ""):
    init_weights = pretrained.read_mapper(str(config.mapper.init))
    init_weights.check_channels(tok.latent_channels, str(config.tokenizer.name))
    init_weights.check_config(mapper_cfg)

  # ---------------------------------------------------------------- latent bank
  bank, bank_info = prepare_bank(config, workdir, sources["train"], tok, local_devices,
                                 progress=progress, compiler_options=opts)
  tok_params = jax.tree.map(lambda x: parallel.replicate_array(np.asarray(x), mesh), tok.params)
  tok_sharding = parallel.replicate_tree(tok_params, mesh)

  # ---------------------------------------------------------------- optimizer
  schedule = make_fast_schedule(config, steps_per_epoch, phase1_steps)
  tx = step_lib.make_optimizer(config, schedule)
  root_key = jax.random.PRNGKey(int(config.seed))
  init_key, noise_key = jax.random.fold_in(root_key, 0), jax.random.fold_in(root_key, 1)
  ema_decay = float(config.fast.ema_decay)

  def init_fn(init_key, noise_key):
    model = latent_mapper.create(mapper_cfg, init_key, dtype=dtype)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": noise_key}
    if ema_decay > 0:  # "params" = the moving average, "train_params" = the optimizer's weights
      state["train_params"] = jax.tree.map(jnp.copy, params)
    return state

  # ---------------------------------------------------------------- shapes, shardings, jit init
  abstract_state = jax.eval_shape(init_fn, init_key, noise_key)
  state_sharding = parallel.replicate_tree(abstract_state, mesh)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
      state_sharding)
  latent_shape = tuple(bank.manifest["latent_shape"])
  with jax.threefry_partitionable(False):
    state = jax.jit(init_fn, in_shardings=(repl, repl), out_shardings=state_sharding)(
        parallel.replicate_array(np.asarray(init_key), mesh),
        parallel.replicate_array(np.asarray(noise_key), mesh))
  if init_weights is not None:  # AdamW's fresh state does not depend on the param values
    weights = jax.tree.map(lambda x: parallel.replicate_array(x, mesh),
                           pretrained.nested_params(init_weights))
    state["params"] = weights
    if "train_params" in state:
      state["train_params"] = jax.tree.map(jnp.copy, weights)
    logging.info("mapper init from %s (sha256 %s)", init_weights.source, init_weights.sha256)

  # ---------------------------------------------------------------- banked steps (jit, donate, AOT)
  compiled: dict[bool, Any] = {}

  def step_fn(dice: bool):
    if dice not in compiled:
      t0 = time.time()
      fn = make_banked_step(graphdef, tok, tx, schedule, banked_loss_kwargs(config, dice=dice),
                            ema_decay=ema_decay)
      fn = jax.jit(fn, in_shardings=(state_sharding, tok_sharding, data_sharding),
                   out_shardings=(state_sharding, repl), donate_argnums=(0,),
                   compiler_options=opts)
      shapes = banked_batch_shapes(global_bs, latent_shape, image_size, has_std=bank.has_std,
                                   dice=dice, sharding=data_sharding)
      compiled[dice] = fn.lower(abstract_state, tok_params, shapes).compile()
      logging.info("banked step (phase %d) compiled: %.1fs", 2 if dice else 1, time.time() - t0)
    return compiled[dice]

  step_fn(dice=phase2_start == 0)

  # ---------------------------------------------------------------- restore
  ckpt = ckpt_lib.Checkpointer(workdir, keep=int(config.keep_checkpoints), metadata=(
      run_metadata.RunMetadata.for_run(
          config, mapper_cfg, tok,
          init=None if init_weights is None else init_weights.provenance("mapper.init")).to_dict()))
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(latest, abstract_state)
    logging.info("resumed from step %d in %s", latest, ckpt.directory)
  step = int(jax.device_get(state["step"]))

  # ---------------------------------------------------------------- evaluator (validation only)
  val = list(pipeline.eval_examples(sources["validation"], image_size=image_size))
  val_images = np.stack([e["image"] for e in val]).astype(np.float32)
  val_masks = np.stack([e["mask"] for e in val]) >= 0.5
  rows = parallel.host_slice(eval_bs)
  encode_val = jax.jit(lambda t, x: tok.encode(t, x).z,
                       in_shardings=(tok_sharding, data_sharding), out_shardings=data_sharding,
                       compiler_options=opts)
  val_z = []  # encoded once: the tokenizer is frozen and validation has no noise
  for i in range(0, len(val_images), eval_bs):
    chunk = val_images[i:i + eval_bs]
    if len(chunk) < eval_bs:  # pad with copies of the last image; their predictions are dropped
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], eval_bs - len(chunk), axis=0)])
    x = jax.make_array_from_process_local_data(data_sharding, chunk[rows], chunk.shape)
    val_z.append(encode_val(tok_params, x))

  def _predict(p, t, z):  # inference.predict_probs after the encoder
    z_out = nnx.merge(graphdef, p)(z)["out"].astype(jnp.float32)
    return tok.decode_mask(t, z_out)

  predict = jax.jit(_predict, in_shardings=(state_sharding["params"], tok_sharding, data_sharding),
                    out_shardings=repl, compiler_options=opts)

  def evaluate(params) -> dict[str, float]:
    probs = np.concatenate([np.asarray(predict(params, tok_params, z)) for z in val_z])
    pred = probs[:len(val_images)] > inference.THRESHOLD
    dsc, iou = metrics_lib.dice_iou(pred, val_masks)
    return {"val_dice": float(np.mean(dsc)), "val_iou": float(np.mean(iou))}

  setup_seconds = time.time() - t_launch
  writer.event(step, event="start", recipe="fast", total_steps=total_steps,
               resumed=latest is not None, process_count=jax.process_count(), devices=n_dev,
               setup_seconds=round(setup_seconds, 3), bank=bank_info)

  # ---------------------------------------------------------------- loop
  logging.info("training steps %d..%d: log every %d, validate every %d, checkpoint every %d",
               step + 1, total_steps, log_every, eval_every, ckpt_every)
  last_saved = latest
  pending: list[tuple[int, Any]] = []
  window: list[dict[str, np.ndarray]] = []
  t_window, steps_window = time.time(), 0
  last_eval: dict[str, float] = {}
  seconds = {"setup": setup_seconds, "bank": bank_info["seconds_now"], "train": 0.0,
             "validation": 0.0, "checkpoint": 0.0}
  summary: dict[str, Any] = {"first_step": step + 1, "bank": bank_info}
  batch_rows = parallel.host_slice(global_bs)

  def drain(keep_last: bool) -> None:
    while len(pending) > (1 if keep_last else 0):
      s, m = pending.pop(0)
      m = jax.device_get(m)
      train_lib.check_finite(s, m, workdir, last_saved)
      window.append(m)

  try:
    t_loop = time.time()
    while step < total_steps:
      dice = step >= phase2_start
      fn = step_fn(dice)
      views, records = bank_lib.batch_entries(step, num_records=bank.num_records,
                                              num_views=bank.num_views, batch_size=global_bs,
                                              seed=int(config.seed))
      local = bank.gather(views[batch_rows], records[batch_rows], masks=dice)
      state, m = fn(state, tok_params, parallel.global_batch(local, mesh))
      step += 1
      steps_window += 1
      pending.append((step, m))
      drain(keep_last=True)

      is_last = step == total_steps
      do_eval, do_ckpt = step % eval_every == 0 or is_last, step % ckpt_every == 0 or is_last
      if step % log_every == 0 or do_eval or do_ckpt:
        drain(keep_last=False)
        scalars = train_lib.window_scalars(window, steps_window, time.time() - t_window)
        scalars["dice_phase"] = float(dice)
        writer.write(step, scalars, prefix="train/")
        if is_main:
          train_lib.log_progress(step, total_steps, scalars, last_eval)
        summary.setdefault("losses", []).append((step, scalars["loss"]))
        window.clear()
        t_window, steps_window = time.time(), 0
      if do_eval:
        t0 = time.time()
        last_eval = evaluate(state["params"])
        seconds["validation"] += time.time() - t0
        writer.write(step, {**last_eval, "seconds": time.time() - t0}, prefix="eval/")
        logging.info("step %d: validation Dice %.4f IoU %.4f", step, last_eval["val_dice"],
                     last_eval["val_iou"])
      if do_ckpt:
        t0 = time.time()
        ckpt.save(step, state, metrics=last_eval if do_eval else None)
        last_saved = step
        seconds["checkpoint"] += time.time() - t0
      if do_eval or do_ckpt:  # steps/s and the ETA count training steps only
        t_window = time.time()
      writer.flush()
    seconds["train"] = time.time() - t_loop - seconds["validation"] - seconds["checkpoint"]
  finally:
    ckpt.wait()
    writer.event(step, event="end", seconds={k: round(v, 3) for k, v in seconds.items()})
    writer.close()
  summary.update(step=step, val=last_eval, best_step=ckpt.best_step(),
                 latest_step=ckpt.latest_step(), seconds=seconds)
  ckpt.close()
  logging.info("done: step %d, best checkpoint %s (validation Dice), last validation %s; wall "
               "time of this run: %s", step, summary["best_step"], last_eval,
               {k: round(v, 1) for k, v in seconds.items()})
  return summary
