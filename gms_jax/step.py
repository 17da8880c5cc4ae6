"""The one builder of the train step and the inference function, for any mesh and target.

:func:`build` takes a config and a mesh (real devices, fake CPU devices, or the devices of a
``jax.experimental.topologies`` description of a TPU slice / GPU host that is not here) and returns
a :class:`Step`: the abstract train state with its shardings, the abstract tokenizer params, the
batch shapes, and the jitted (not yet lowered) init, train step and inference functions. Nothing
in it touches a host buffer or a concrete array, so the very program ``gms-jax train`` runs is what
``gms-jax compile`` compiles for a TPU pod from a CPU host and what ``benchmarks/`` time::

    step = build(config, mesh, tokenizer=tok, steps_per_epoch=n)
    compiled = step.lower_train().compile()                # AOT: memory_analysis(), cost_analysis()
    state = step.init()                                     # training: created sharded
    state, metrics = compiled(state, tok_params, batch)

``"auto"`` loss settings (``config.loss.batch_decode`` / ``batch_encode``) resolve from the
*mesh's* platform, not the host's.

Data parallel on a 1-D ``('data',)`` mesh: mapper params and optimizer state replicated, batches
split on their leading axis, tokenizer params a separate replicated non-donated argument. The only
cross-device traffic of the compiled step is the all-reduce of gradients and metrics (the loss
keeps each device's rows together, :func:`gms_jax.loss.interleave`); inference outputs stay
sharded like its inputs (no gather inside the program).

Global batch: ``config.per_device_batch_size`` (> 0) times the device count, else
``config.batch_size``. Learning-rate rule: ``config.optimizer.lr_scaling`` ``"none"`` (default:
``learning_rate`` as given, the paper's value at its batch of 8) or ``"sqrt"`` / ``"linear"``:
``learning_rate * (global_batch / optimizer.lr_base_batch) ** (1/2 or 1)``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gms_jax import classes as classes_lib
from gms_jax import configuration, inference, parallel, tokenizers
from gms_jax import loss as loss_lib
from gms_jax.models import latent_mapper
from gms_jax.models.latent_mapper import MapperConfig

LR_SCALING = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}


# ----------------------------------------------------------------------------- pieces


def mesh_platform(mesh: Mesh) -> str:
  """``"cpu"``, ``"gpu"`` or ``"tpu"`` for the devices of ``mesh`` (CUDA/ROCm -> ``"gpu"``)."""
  p = str(mesh.devices.flat[0].platform).lower()
  return "gpu" if p in ("gpu", "cuda", "rocm") else p


def global_batch_size(config: ml_collections.ConfigDict, n_devices: int) -> int:
  """``per_device_batch_size * n_devices`` when that key is > 0, else ``batch_size``."""
  per_device = int(config.get("per_device_batch_size", 0) or 0)
  return per_device * n_devices if per_device > 0 else int(config.batch_size)


def learning_rate(config: ml_collections.ConfigDict, global_bs: int) -> float:
  """Peak LR for a global batch (module docstring: ``optimizer.lr_scaling``)."""
  o = config.optimizer
  rule = str(o.get("lr_scaling", "none"))
  if rule not in LR_SCALING:
    raise ValueError(
      f"config.optimizer.lr_scaling must be one of {sorted(LR_SCALING)}, got {rule!r}"
    )
  base = int(o.get("lr_base_batch", 8))
  return float(o.learning_rate) * (global_bs / base) ** LR_SCALING[rule]


def make_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int, peak_lr: float | None = None
) -> Callable:
  """Optimizer-step count -> learning rate: linear warm-up from 0 over ``warmup_epochs``, cosine
  to 0 at ``num_epochs``; per integer epoch (``schedule.per_epoch``) or per step."""
  epoch_schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.optimizer.learning_rate if peak_lr is None else peak_lr,
    warmup_steps=config.schedule.warmup_epochs,
    decay_steps=config.num_epochs,
    end_value=0.0,
  )
  per_epoch = bool(config.schedule.per_epoch)

  def schedule(count):
    count = jnp.asarray(count)
    epoch = count // steps_per_epoch if per_epoch else count / steps_per_epoch
    return epoch_schedule(epoch)

  return schedule


def make_optimizer(
  config: ml_collections.ConfigDict, schedule: Callable
) -> optax.GradientTransformation:
  """AdamW (docs/METHOD.md §3: lr 2e-3, betas 0.9/0.999, eps 1e-8, decoupled weight decay 0.01)."""
  o = config.optimizer
  return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)


def resolve_batch_decode(
  value: Any, platform: str | None = None, *, name: str = "batch_decode"
) -> bool:
  """``config.loss.batch_decode`` / ``batch_encode``: ``"auto"`` makes one tokenizer call for the
  heads (for images and masks) on GPU/TPU and one call per head (per input) on CPU, where the
  larger activations fall out of cache (measured on a 2-core CPU, TAEF2 batch 8 x 224²:
  28.5-29.6 s per step with the heads batched vs 21.0-23.7 s per head; see benchmarks/RESULTS.md
  for the encoder). ``platform`` is the target's (:func:`mesh_platform`); None = the host's."""
  if isinstance(value, bool):
    return value
  v = str(value).strip().lower()
  if v == "auto":
    return (platform or jax.default_backend()) != "cpu"
  if v in ("true", "yes", "on", "1"):
    return True
  if v in ("false", "no", "off", "0"):
    return False
  raise ValueError(f"config.loss.{name} must be 'auto', 'true' or 'false', got {value!r}")


# config.cpu_library_fusion names -> XLA's LibraryFusionType (xla_cpu_experimental_ynn_fusion_type)
CPU_LIBRARY_FUSIONS = {
  n: "LIBRARY_FUSION_TYPE_" + n.upper() for n in configuration.CPU_LIBRARY_FUSIONS
}


def cpu_compiler_options(fusion: str, platform: str | None = None) -> dict[str, str] | None:
  """XLA options for a jit on ``platform`` (None = the host's): on CPU, ``fusion`` (e.g.
  ``"dot,reduce"``, :data:`CPU_LIBRARY_FUSIONS`) hands those ops to XLA's YNNPACK library
  fusions (``xla_cpu_experimental_ynn_fusion_type``, experimental in jaxlib 0.10.2; measured in
  benchmarks/cpu_fusion.py); "" or another platform: None (XLA's defaults)."""
  names = configuration.cpu_library_fusions(fusion or "")
  if not names or (platform or jax.default_backend()) != "cpu":
    return None
  return {"xla_cpu_experimental_ynn_fusion_type": ",".join(CPU_LIBRARY_FUSIONS[n] for n in names)}


def compiler_options(
  config: ml_collections.ConfigDict, platform: str | None = None
) -> dict[str, str] | None:
  """``compiler_options`` of every jit a trainer builds from ``config`` (see
  :func:`cpu_compiler_options`; ``config.cpu_library_fusion``, "" by default)."""
  return cpu_compiler_options(str(config.get("cpu_library_fusion", "") or ""), platform)


def loss_kwargs(config: ml_collections.ConfigDict, platform: str | None = None) -> dict[str, Any]:
  """The keyword arguments of :func:`gms_jax.loss.train_loss` that ``config.loss`` sets."""
  return dict(
    noise_prob=float(config.loss.noise_prob),
    heads=tuple(config.loss.heads),
    rec_weight=float(config.loss.rec_weight),
    dice_weight=float(config.loss.dice_weight),
    batch_decode=resolve_batch_decode(config.loss.get("batch_decode", "auto"), platform),
    batch_encode=resolve_batch_decode(
      config.loss.get("batch_encode", "auto"), platform, name="batch_encode"
    ),
    classes=classes_lib.from_config(config),
  )


def make_train_step(
  graphdef: Any,
  tokenizer: tokenizers.Tokenizer,
  tx: optax.GradientTransformation,
  schedule: Callable,
  loss_kw: dict[str, Any],
  *,
  banked: bool = False,
  ema_decay: float = 0.0,
) -> Callable:
  """The (un-jitted) step ``(state, tok_params, batch) -> (state, metrics)`` of either recipe.

  ``state`` (:func:`make_state_fn`) = ``{"step", "params" (pure dict of mapper params),
  "opt_state", "rng"}`` (+ ``"train_params"`` with EMA); step ``s`` draws its latent noise from
  ``fold_in(rng, s)``. ``banked=False``: :func:`gms_jax.loss.train_loss` on an image batch (the
  exact recipe); ``True``: :func:`gms_jax.loss.banked_train_loss` on a banked latent batch (the
  fast recipe; ``loss_kw`` from :func:`banked_loss_kwargs`). With ``ema_decay > 0`` the
  optimizer's weights are ``state["train_params"]`` and ``state["params"]`` is their exponential
  moving average (what validation selects and ``gms-jax evaluate`` / ``predict`` load). Only the
  mapper's weights are differentiated; the tokenizer gets input-gradients only.
  """
  ema = float(ema_decay) > 0.0
  loss_impl = loss_lib.banked_train_loss if banked else loss_lib.train_loss

  def train_step(state, tok_params, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    weights = state["train_params"] if ema else state["params"]

    def loss_fn(params):
      return loss_impl(graphdef, params, tokenizer, tok_params, batch, rng, **loss_kw)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(weights)
    updates, opt_state = tx.update(grads, state["opt_state"], weights)
    weights = optax.apply_updates(weights, updates)
    new_state = {
      "step": state["step"] + 1,
      "params": weights,
      "opt_state": opt_state,
      "rng": state["rng"],
    }
    if ema:
      d = ema_decay_at(ema_decay, state["step"])
      new_state["train_params"] = weights
      new_state["params"] = jax.tree.map(
        lambda e, w: d * e + (1.0 - d) * w, state["params"], weights
      )
    metrics = {
      "loss": loss,
      **terms,
      "lr": schedule(state["step"]),
      "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics

  return train_step


def ema_decay_at(decay: float, step):
  """The EMA decay at optimizer step ``step`` (0-based): ``min(decay, (1 + s) / (10 + s))``, so
  the average forgets the random init quickly."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def banked_loss_kwargs(
  config: ml_collections.ConfigDict, *, dice: bool, platform: str | None = None
) -> dict[str, Any]:
  """``config.loss`` as :func:`gms_jax.loss.banked_train_loss` keywords; ``dice=False`` = phase 1
  (latent term only: the decoder is not in the program)."""
  kw = loss_kwargs(config, platform)
  kw.pop("batch_encode")
  kw["dice_weight"] = kw["dice_weight"] if dice else 0.0
  return kw


def make_fast_schedule(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  phase1_steps: int,
  peak_lr: float | None = None,
) -> Callable:
  """The fast recipe's LR: phase 1 is :func:`make_schedule` (warm-up + cosine to 0 at
  ``num_epochs``, peaking at ``peak_lr``); from step ``phase1_steps`` on (phase 2) the constant
  ``fast.dice_learning_rate``, scaled by the same rule as the peak (:func:`learning_rate`)."""
  base = make_schedule(config, steps_per_epoch, peak_lr)
  scale = 1.0 if peak_lr is None else peak_lr / float(config.optimizer.learning_rate)
  dice_lr = float(config.fast.dice_learning_rate) * scale

  def schedule(count):
    count = jnp.asarray(count)
    return jnp.where(count < phase1_steps, base(count), jnp.float32(dice_lr))

  return schedule


def recipe(config: ml_collections.ConfigDict) -> str:
  name = str(config.get("recipe", "exact"))
  if name not in RECIPES:
    raise ValueError(f"config.recipe must be one of {RECIPES}, got {name!r}")
  return name


RECIPES = ("exact", "fast")


def phase_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> tuple[int, int]:
  """``(phase1_steps, total_steps)`` of a run: phase 1 is ``num_train_steps`` (> 0) or
  ``num_epochs * steps_per_epoch``; the fast recipe adds ``fast.dice_steps`` (phase 2)."""
  n = int(config.num_train_steps)
  phase1 = n if n > 0 else int(config.num_epochs) * int(steps_per_epoch)
  extra = max(int(config.fast.dice_steps), 0) if recipe(config) == "fast" else 0
  return phase1, phase1 + extra


def mapper_config(config: ml_collections.ConfigDict, tok: tokenizers.Tokenizer) -> MapperConfig:
  """The one construction of a run's :class:`MapperConfig` (channels from the tokenizer; out
  channels = the mask latent's: one latent per foreground class with the channels coding)."""
  return MapperConfig(
    in_channels=tok.latent_channels,
    out_channels=classes_lib.from_config(config).mask_latent_channels(tok.latent_channels),
    ch=int(config.mapper.ch),
    ch_mult=tuple(config.mapper.ch_mult),
  )


def make_state_fn(
  mcfg: MapperConfig,
  dtype: Any,
  tx: optax.GradientTransformation,
  seed: int,
  *,
  ema: bool = False,
  params: Any = None,
) -> Callable[[], dict[str, Any]]:
  """The one train-state constructor: ``() -> {"step", "params", "opt_state", "rng"}`` (+
  ``"train_params"``, a copy of the weights the optimizer moves, when ``ema``). Keys:
  ``fold_in(PRNGKey(seed), 0)`` initialises the mapper, ``fold_in(..., 1)`` is the noise key.
  ``jax.eval_shape`` of it is the abstract state; jitted, the concrete one. ``params`` (a pure
  dict, e.g. ``gms-jax import``'s weights) replaces the random init; AdamW's fresh state does not
  depend on the values."""

  def init_fn():
    root = jax.random.PRNGKey(seed)
    init_key, noise_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
    if params is None:
      model = latent_mapper.create(mcfg, init_key, dtype=dtype)
      weights = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    else:
      weights = params
    state = {
      "step": jnp.zeros((), jnp.int32),
      "params": weights,
      "opt_state": tx.init(weights),
      "rng": noise_key,
    }
    if ema:  # "params" = the moving average, "train_params" = the optimizer's weights
      state["train_params"] = jax.tree.map(jnp.copy, weights)
    return state

  return init_fn


def with_weights(state: dict[str, Any], weights: Any) -> dict[str, Any]:
  """``state`` starting from ``weights`` (``config.mapper.init``, ``gms-jax import``): the params
  (and the EMA's train_params) replaced; AdamW's fresh state does not depend on their values."""
  state = dict(state, params=weights)
  if "train_params" in state:
    state["train_params"] = jax.tree.map(jnp.copy, weights)
  return state


def _with_sharding(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
  )


def bank_encode_fn(
  tok: tokenizers.Tokenizer, classes: classes_lib.Classes | None = None
) -> Callable:
  """``(tok_params, images01, masks01) -> {"z_image", "std_image", "z_mask"}``: what the latent
  bank stores for a batch of views (the image's latent and posterior std, the mask's latent: for
  C > 2 classes the label map's, :meth:`gms_jax.classes.Classes.mask_images`)."""
  classes = classes or classes_lib.Classes(2)

  def encode(tp, images, masks):
    lat = tok.encode(tp, images)
    if classes.binary:
      z_mask = tok.encode(tp, jnp.repeat(masks[..., None], 3, axis=-1)).z
    else:
      parts = [tok.encode(tp, m).z for m in classes.mask_images(masks)]
      z_mask = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    return {"z_image": lat.z, "std_image": lat.std, "z_mask": z_mask}

  return encode


# ----------------------------------------------------------------------------- the builder


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
  """What :func:`build` returns; every array field is a ``jax.ShapeDtypeStruct`` with sharding.

  ``train_steps`` maps a step name to its jitted ``(state, tok_params, batch) -> (state,
  metrics)`` (state donated): ``"exact"`` for the exact recipe; ``"phase1"`` (latent term, no
  decoder) and ``"phase2"`` (+ decoder Dice) for the fast recipe. ``batch_shapes[name]`` is the
  global batch each takes; :meth:`step_name` says which one step ``s`` runs."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  platform: str  # the mesh's: "cpu" / "gpu" / "tpu"
  recipe: str  # "exact" / "fast"
  tokenizer: tokenizers.Tokenizer
  mapper_cfg: MapperConfig
  classes: classes_lib.Classes  # the task's classes and mask coding
  graphdef: Any  # the mapper's NNX graphdef
  dtype: Any  # compute dtype (None = float32)
  global_batch_size: int
  image_size: int
  latent_shape: tuple[int, int, int]
  peak_lr: float
  steps_per_epoch: int
  phase1_steps: int
  total_steps: int
  loss_kw: dict[str, Any]  # the exact loss's; banked: loss_kws
  loss_kws: dict[str, dict[str, Any]]  # per step name
  compiler_options: dict[str, str] | None
  schedule: Callable
  tx: optax.GradientTransformation
  replicated: NamedSharding
  data_sharding: NamedSharding
  state_sharding: Any
  abstract_state: Any
  tok_sharding: Any
  abstract_tok_params: Any
  batch_shapes: dict[str, dict[str, jax.ShapeDtypeStruct]]
  init: Callable  # () -> state, created sharded
  train_steps: dict[str, Any]
  predict: Any  # jitted (params, tok_params, images01) -> class scores, batch-sharded in and out
  predict_latents: Any  # jitted (params, tok_params, z_image) -> scores (validation on latents)
  encode_images: Any  # jitted (tok_params, images01) -> z_image
  bank_encode: Any  # jitted (tok_params, images01, masks01) -> bank entries (bank_encode_fn)

  @property
  def n_devices(self) -> int:
    return int(self.mesh.devices.size)

  @property
  def train_step(self) -> Any:
    """The step of the first phase (the exact step, or the banked phase-1 step)."""
    return self.train_steps[self.step_names[0]]

  @property
  def step_names(self) -> tuple[str, ...]:
    if self.recipe == "exact":
      return ("exact",)
    phases = []
    if self.phase1_steps > 0:
      phases.append("phase1")
    if self.total_steps > self.phase1_steps:
      phases.append("phase2")
    return tuple(phases) or ("phase1",)

  def step_name(self, step: int) -> str:
    """The step that optimizer step ``step`` (0-based) runs."""
    if self.recipe == "exact":
      return "exact"
    return "phase1" if step < self.phase1_steps else "phase2"

  def images_shape(self, n: int) -> jax.ShapeDtypeStruct:
    """(n, S, S, 3) float32 images, batch-sharded (``n`` must divide over the devices)."""
    parallel.check_batch_size(n, self.mesh, "inference batch")
    return jax.ShapeDtypeStruct(
      (n, self.image_size, self.image_size, 3), jnp.float32, sharding=self.data_sharding
    )

  def lower_train(self, name: str | None = None):
    name = name or self.step_names[0]
    return self.train_steps[name].lower(
      self.abstract_state, self.abstract_tok_params, self.batch_shapes[name]
    )

  def lower_predict(self, n: int):
    return self.predict.lower(
      self.abstract_state["params"], self.abstract_tok_params, self.images_shape(n)
    )

  def lower_bank_encode(self, n: int):
    images = self.images_shape(n)
    masks = jax.ShapeDtypeStruct(images.shape[:3], jnp.float32, sharding=self.data_sharding)
    return self.bank_encode.lower(self.abstract_tok_params, images, masks)


def batch_shapes(
  recipe_name: str,
  global_bs: int,
  image_size: int,
  latent_shape,
  *,
  has_std: bool,
  sharding=None,
  mask_latent_shape=None,
) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """The global batch of each step of a recipe: images and masks (exact), or what
  :meth:`gms_jax.bank.Bank.gather` returns (banked: latents, the std where the tokenizer has a
  posterior, and the full-resolution mask in phase 2)."""

  def s(shape):
    return jax.ShapeDtypeStruct((global_bs, *shape), jnp.float32, sharding=sharding)

  if recipe_name == "exact":
    return {"exact": {"image": s((image_size, image_size, 3)), "mask": s((image_size, image_size))}}
  out = {}
  for name, dice in (("phase1", False), ("phase2", True)):
    b = {"z_image": s(latent_shape), "z_mask": s(mask_latent_shape or latent_shape)}
    if has_std:
      b["std_image"] = s(latent_shape)
    if dice:
      b["mask"] = s((image_size, image_size))
    out[name] = b
  return out


def build(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  *,
  tokenizer: tokenizers.Tokenizer | None = None,
  steps_per_epoch: int = 1,
  global_batch: int | None = None,
  platform: str | None = None,
) -> Step:
  """Every program of ``config``'s recipe on ``mesh`` (module docstring): the train step(s),
  inference and (fast recipe) the bank encoder.

  Args:
    config: see ``configs/gms.py``.
    mesh: a 1-D ``('data',)`` mesh (:func:`gms_jax.parallel.make_mesh`) over real or topology
      devices; its platform resolves ``"auto"`` settings.
    tokenizer: a real or abstract (:func:`gms_jax.tokenizers.abstract`) tokenizer; default: the
      config's architecture, abstract (no weights are read).
    steps_per_epoch: for the LR schedule and the phases (constants in the programs; shapes do not
      depend on them).
    global_batch: overrides :func:`global_batch_size`.
    platform: resolves ``"auto"`` settings instead of the mesh's platform (e.g. the per-device
      program of a GPU target lowered on a CPU host for its FLOP count).
  """
  platform = platform or mesh_platform(mesh)
  rname = recipe(config)
  tok = tokenizer if tokenizer is not None else tokenizers.abstract_from_config(config)
  global_bs = parallel.check_batch_size(
    int(global_batch) if global_batch else global_batch_size(config, mesh.devices.size), mesh
  )
  image_size = int(config.data.image_size)
  if image_size % tok.downsample:
    raise ValueError(
      f"config.data.image_size={image_size} is not a multiple of "
      f"{tok.downsample} (the tokenizer's downsampling)"
    )
  f = tok.downsample
  latent_shape = (image_size // f, image_size // f, int(tok.latent_channels))
  repl, data_sharding = parallel.replicated(mesh), parallel.data_sharded(mesh)

  # ---------------------------------------------------------------- model, schedule, optimizer
  dtype = tokenizers.compute_dtype(str(config.get("precision", "float32")))
  mcfg = mapper_config(config, tok)
  graphdef, _ = nnx.split(latent_mapper.abstract(mcfg, dtype), nnx.Param)
  peak_lr = learning_rate(config, global_bs)
  phase1, total = phase_steps(config, steps_per_epoch)
  if rname == "fast":
    schedule = make_fast_schedule(config, steps_per_epoch, phase1, peak_lr)
    ema_decay = float(config.fast.ema_decay)
  else:
    schedule = make_schedule(config, steps_per_epoch, peak_lr)
    ema_decay = 0.0
  tx = make_optimizer(config, schedule)
  init_fn = make_state_fn(mcfg, dtype, tx, int(config.seed), ema=ema_decay > 0)

  # ---------------------------------------------------------------- shapes, shardings
  abstract_state = jax.eval_shape(init_fn)
  state_sharding = parallel.replicate_tree(abstract_state, mesh)
  abstract_state = _with_sharding(abstract_state, state_sharding)
  tok_shapes = tokenizers.shapes(tok)
  tok_sharding = parallel.replicate_tree(tok_shapes, mesh)
  abstract_tok = _with_sharding(tok_shapes, tok_sharding)
  classes = classes_lib.from_config(config)
  mask_latent_shape = (*latent_shape[:2], classes.mask_latent_channels(tok.latent_channels))
  shapes = batch_shapes(
    rname,
    global_bs,
    image_size,
    latent_shape,
    has_std=tok.has_posterior,
    sharding=data_sharding,
    mask_latent_shape=mask_latent_shape,
  )

  # ---------------------------------------------------------------- jitted functions
  init_jit = jax.jit(init_fn, out_shardings=state_sharding)
  opts = compiler_options(config, platform)

  def init():
    # Non-partitionable threefry for the one-off init: same values, several times faster to
    # compile on CPU; the output is replicated, so it does not depend on the device count.
    with jax.threefry_partitionable(False):
      return init_jit()

  loss_kw = loss_kwargs(config, platform)
  if rname == "exact":
    loss_kws = {"exact": loss_kw}
  else:
    loss_kws = {
      "phase1": banked_loss_kwargs(config, dice=False, platform=platform),
      "phase2": banked_loss_kwargs(config, dice=True, platform=platform),
    }
  train_steps = {
    name: jax.jit(
      make_train_step(graphdef, tok, tx, schedule, kw, banked=rname == "fast", ema_decay=ema_decay),
      in_shardings=(state_sharding, tok_sharding, data_sharding),
      out_shardings=(state_sharding, repl),
      donate_argnums=(0,),
      compiler_options=opts,
    )
    for name, kw in loss_kws.items()
  }
  params_sharding = state_sharding["params"]
  predict = jax.jit(
    lambda p, t, x: inference.predict_probs(graphdef, p, tok, t, x, classes=classes),
    in_shardings=(params_sharding, tok_sharding, data_sharding),
    out_shardings=data_sharding,
    compiler_options=opts,
  )
  predict_latents = jax.jit(
    lambda p, t, z: inference.probs_from_latents(graphdef, p, tok, t, z, classes=classes),
    in_shardings=(params_sharding, tok_sharding, data_sharding),
    out_shardings=data_sharding,
    compiler_options=opts,
  )
  encode_images = jax.jit(
    lambda t, x: tok.encode(t, x).z,
    in_shardings=(tok_sharding, data_sharding),
    out_shardings=data_sharding,
    compiler_options=opts,
  )
  bank_encode = jax.jit(
    bank_encode_fn(tok, classes),
    in_shardings=(tok_sharding, data_sharding, data_sharding),
    out_shardings=data_sharding,
    compiler_options=opts,
  )
  return Step(
    config=config,
    mesh=mesh,
    platform=platform,
    recipe=rname,
    tokenizer=tok,
    mapper_cfg=mcfg,
    classes=classes,
    graphdef=graphdef,
    dtype=dtype,
    global_batch_size=global_bs,
    image_size=image_size,
    latent_shape=latent_shape,
    peak_lr=peak_lr,
    steps_per_epoch=int(steps_per_epoch),
    phase1_steps=phase1,
    total_steps=total,
    loss_kw=loss_kw,
    loss_kws=loss_kws,
    compiler_options=opts,
    schedule=schedule,
    tx=tx,
    replicated=repl,
    data_sharding=data_sharding,
    state_sharding=state_sharding,
    abstract_state=abstract_state,
    tok_sharding=tok_sharding,
    abstract_tok_params=abstract_tok,
    batch_shapes=shapes,
    init=init,
    train_steps=train_steps,
    predict=predict,
    predict_latents=predict_latents,
    encode_images=encode_images,
    bank_encode=bank_encode,
  )


# ----------------------------------------------------------------------------- compiled-program facts


COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "all-to-all",
  "collective-permute",
  "reduce-scatter",
  "collective-broadcast",
  "ragged-all-to-all",
)


def collective_counts(hlo_text: str) -> dict[str, int]:
  """Count of each collective op in an (optimized) HLO module's text: ``compiled.as_text()``.

  Async pairs (``all-reduce-start`` / ``-done``) count once, as their op."""
  counts = {c: 0 for c in COLLECTIVES}
  # "%name = SHAPE OP(operands), attrs": the opcode follows the result shape, which ends in
  # "]" (array), "}" (layout) or ")" (tuple).
  op = re.compile(r"[\]\})]\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
  for line in hlo_text.splitlines():
    m = op.search(line.split(", metadata=")[0])
    if m:
      counts[m.group(1)] += 1
  return counts


def enable_compilation_cache(config: ml_collections.ConfigDict) -> None:
  """``config.compilation_cache_dir`` (non-empty): JAX's persistent compilation cache there, so a
  restarted job (e.g. on a pod) loads its compiled step instead of compiling it again."""
  path = str(config.get("compilation_cache_dir", "") or "")
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
