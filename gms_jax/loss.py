"""The GMS training loss (docs/METHOD.md §3), exactly as the original computes it.

For a batch of images and binary masks, with a frozen tokenizer (``tok``) and the mapper::

    z_img, std = tok.encode(image)          # scaled posterior mean, UNscaled posterior std
    z_mask     = tok.encode(mask as RGB).z  # never noised
    with probability noise_prob (ONE draw per batch):  z_img = z_img + std * eps,  eps ~ N(0, 1)
    out = mapper(z_img)                     # {"level3", "level2", "level1", "out"}
    loss = rec_weight  * sum_k MSE(out[k], z_mask)
         + dice_weight * sum_k DiceLoss(tok.decode_mask(out[k]), grey mask)   k in heads

``DiceLoss`` is MONAI's default ``DiceLoss()``: per sample, ``1 - (2 sum(p g) + 1e-5) /
(sum p + sum g + 1e-5)``, mean over the batch. The grey mask is the RGB mean of the [0,1] mask
(our masks are single-channel, so it is the mask itself). Gradients flow through the frozen
decoder into the mapper; the tokenizer's params are under ``stop_gradient``.

With ``batch_decode=True`` the three heads are decoded in ONE decoder call (interleaved on the
batch axis, :func:`interleave`, so a data-parallel step moves no activations between devices): the decoder normalises each sample on its own, so this equals the per-head sum that
``batch_decode=False`` computes (the tests check both agree). One call suits accelerators; on CPU
one call per head is faster (smaller activations), which ``config.loss.batch_decode="auto"`` picks.
``batch_encode`` is the same choice for the encoder (images and masks in one call of 2B, or two
calls of B; ``config.loss.batch_encode="auto"``). Everything returned is float32 whatever the
compute dtype.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gms_jax import classes as classes_lib

HEADS = ("level2", "level1", "out")
DICE_SMOOTH_NR = 1e-5  # MONAI DiceLoss defaults
DICE_SMOOTH_DR = 1e-5
BINARY = classes_lib.Classes(2)


def dice_loss(
  pred: jax.Array,
  target: jax.Array,
  *,
  smooth_nr: float = DICE_SMOOTH_NR,
  smooth_dr: float = DICE_SMOOTH_DR,
) -> jax.Array:
  """MONAI ``DiceLoss()`` (no sigmoid, include background, mean): (B, ...) -> scalar."""
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  axes = tuple(range(1, pred.ndim))
  inter = jnp.sum(pred * target, axis=axes)
  denom = jnp.sum(pred, axis=axes) + jnp.sum(target, axis=axes)
  return jnp.mean(1.0 - (2.0 * inter + smooth_nr) / (denom + smooth_dr))


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """torch ``F.mse_loss`` (mean over every element), in float32."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def sample_latent_noise(
  rng: jax.Array, shape: Sequence[int], noise_prob: float
) -> tuple[jax.Array, jax.Array]:
  """One Bernoulli(noise_prob) per batch and eps ~ N(0,1) of the latent's shape."""
  k_apply, k_eps = jax.random.split(rng)
  apply = jax.random.bernoulli(k_apply, noise_prob)
  eps = jax.random.normal(k_eps, tuple(shape), jnp.float32)
  return apply, eps


def interleave(arrays: Sequence[jax.Array]) -> jax.Array:
  """k arrays of (B, ...) -> one (k*B, ...) array with row ``k*i + j`` = ``arrays[j][i]``.

  Unlike ``concatenate(arrays, 0)``, each sample's k rows stay next to each other, so when the
  batch axis is split over devices every device keeps exactly its own rows (the stack is on a new
  unsharded axis and the reshape merges it into the sharded one): no activation moves between
  devices. Row order does not matter to the tokenizer, which normalises each sample on its own."""
  stacked = jnp.stack(arrays, axis=1)  # (B, k, ...)
  return stacked.reshape((-1,) + stacked.shape[2:])


def deinterleave(x: jax.Array, k: int) -> list[jax.Array]:
  """Inverse of :func:`interleave`: (k*B, ...) -> k arrays of (B, ...)."""
  x = x.reshape((-1, k) + x.shape[1:])
  return [x[:, j] for j in range(k)]


def heads_dice(
  tokenizer: Any,
  tok_params: Any,
  preds: Sequence[jax.Array],
  labels: jax.Array,
  *,
  batch_decode: bool,
  classes: classes_lib.Classes | None = None,
) -> jax.Array:
  """Sum over the heads' latents of the Dice loss of their decoded masks against ``labels``
  (the grey mask of a binary task; the label map otherwise, each foreground class's Dice averaged,
  :mod:`gms_jax.classes`): one decoder call for all heads (and classes), interleaved per sample so
  each device decodes only its own rows (``batch_decode``), or one call per latent. Used by the
  exact and the banked loss."""
  classes = classes or BINARY
  parts = [part for p in preds for part in classes.split_latent(p)]
  if batch_decode:
    decoded = deinterleave(classes.decode(tokenizer, tok_params, interleave(parts)), len(parts))
  else:
    decoded = [classes.decode(tokenizer, tok_params, p) for p in parts]
  n = classes.num_mask_images
  total = jnp.zeros((), jnp.float32)
  for h in range(len(preds)):
    scores = classes.scores(decoded[h * n : (h + 1) * n])
    if classes.binary:
      total = total + dice_loss(scores, labels)
    else:
      total = (
        total
        + sum(
          dice_loss(scores[..., c - 1], classes.fg_mask(labels, c))
          for c in range(1, classes.num_classes)
        )
        / classes.num_fg
      )
  return total


def _as_grey_and_rgb(masks01):
  masks01 = jnp.asarray(masks01, jnp.float32)
  if masks01.ndim == 4:  # (B,H,W,3) RGB mask
    return jnp.mean(masks01, axis=-1), masks01
  return masks01, jnp.repeat(masks01[..., None], 3, axis=-1)


def gms_loss(
  mapper_graphdef: Any,
  mapper_params: Any,
  tokenizer: Any,
  tok_params: Any,
  images01: jax.Array,
  masks01: jax.Array,
  *,
  apply_noise: jax.Array | bool,
  eps: jax.Array | None,
  heads: Sequence[str] = HEADS,
  rec_weight: float = 1.0,
  dice_weight: float = 1.0,
  batch_decode: bool = True,
  batch_encode: bool = True,
  classes: classes_lib.Classes | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss for given noise (``apply_noise``, ``eps``); returns ``(loss, terms)``.

  Args:
    mapper_graphdef, mapper_params: the NNX mapper, split (only ``mapper_params`` is meant to be
      differentiated).
    tokenizer, tok_params: a :class:`gms_jax.tokenizers.Tokenizer` and its (frozen) params.
    images01: (B,S,S,3) in [0,1]. masks01: (B,S,S) in {0,1} (or (B,S,S,3) RGB masks); with
      ``classes`` of C > 2: (B,S,S) label maps (class ids as floats).
    apply_noise: scalar bool, whether this batch's image latent gets ``std * eps``.
    eps: (B,h,w,C) standard normal noise (ignored when ``apply_noise`` is False; may be None then).
    classes: the task's classes (:mod:`gms_jax.classes`; default binary).
  """
  tok_params = jax.lax.stop_gradient(tok_params)
  classes = classes or BINARY
  if classes.binary:
    grey, rgb = _as_grey_and_rgb(masks01)
    mask_images = [rgb]
  else:
    grey = jnp.asarray(masks01, jnp.float32)  # the label map
    mask_images = classes.mask_images(grey)
  images01 = jnp.asarray(images01, jnp.float32)
  n = len(mask_images)
  if batch_encode:
    lat = tokenizer.encode(tok_params, interleave([images01, *mask_images]))
    zs, stds = deinterleave(lat.z, n + 1), deinterleave(lat.std, n + 1)
    z_img, std, z_masks = zs[0], stds[0], zs[1:]
  else:
    z_img, std = tokenizer.encode(tok_params, images01)
    z_masks = [tokenizer.encode(tok_params, m).z for m in mask_images]
  z_mask = z_masks[0] if n == 1 else jnp.concatenate(z_masks, axis=-1)
  if eps is not None:
    z_img = z_img + jnp.where(apply_noise, std * eps, jnp.zeros_like(z_img))
  z_img, z_mask = jax.lax.stop_gradient(z_img), jax.lax.stop_gradient(z_mask)

  mapper = nnx.merge(mapper_graphdef, mapper_params)
  out = mapper(z_img)
  preds = [out[k].astype(jnp.float32) for k in heads]
  rec = sum(mse(p, z_mask) for p in preds)
  dice = heads_dice(tokenizer, tok_params, preds, grey, batch_decode=batch_decode, classes=classes)
  loss = rec_weight * rec + dice_weight * dice
  terms = {
    "rec": rec,
    "dice": dice,
    "noise": jnp.asarray(apply_noise if eps is not None else False, jnp.float32),
  }
  return loss.astype(jnp.float32), terms


def train_loss(
  mapper_graphdef: Any,
  mapper_params: Any,
  tokenizer: Any,
  tok_params: Any,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  *,
  noise_prob: float = 0.5,
  heads: Sequence[str] = HEADS,
  rec_weight: float = 1.0,
  dice_weight: float = 1.0,
  batch_decode: bool = True,
  batch_encode: bool = True,
  classes: classes_lib.Classes | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """:func:`gms_loss` with the noise drawn from ``rng`` (one Bernoulli per batch)."""
  images = batch["image"]
  f = tokenizer.downsample
  z_shape = (images.shape[0], images.shape[1] // f, images.shape[2] // f, tokenizer.latent_channels)
  apply, eps = sample_latent_noise(rng, z_shape, noise_prob)
  return gms_loss(
    mapper_graphdef,
    mapper_params,
    tokenizer,
    tok_params,
    images,
    batch["mask"],
    apply_noise=apply,
    eps=eps,
    heads=heads,
    rec_weight=rec_weight,
    dice_weight=dice_weight,
    batch_decode=batch_decode,
    batch_encode=batch_encode,
    classes=classes,
  )


# ----------------------------------------------------------------------------- banked (fast recipe)


def banked_loss(
  mapper_graphdef: Any,
  mapper_params: Any,
  tokenizer: Any,
  tok_params: Any,
  batch: dict[str, jax.Array],
  *,
  apply_noise: jax.Array | bool,
  eps: jax.Array | None,
  heads: Sequence[str] = HEADS,
  rec_weight: float = 1.0,
  dice_weight: float = 0.0,
  batch_decode: bool = True,
  classes: classes_lib.Classes | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """:func:`gms_loss` on latents read from a latent bank (:mod:`gms_jax.bank`) instead of images.

  ``batch``: ``z_image``, ``z_mask`` (B,h,w,C) as ``tokenizer.encode`` returned them for the
  augmented view, ``std_image`` (B,h,w,C; absent for tokenizers without a posterior, whose std is
  0) and, when ``dice_weight > 0``, ``mask`` (B,S,S) in {0,1} (label maps for C > 2 classes). The same terms as :func:`gms_loss`
  for the same view and noise; with ``dice_weight == 0`` (phase 1) the decoder is never called.
  """
  z_img = jnp.asarray(batch["z_image"], jnp.float32)
  z_mask = jax.lax.stop_gradient(jnp.asarray(batch["z_mask"], jnp.float32))
  std = batch.get("std_image")
  noised = eps is not None and std is not None
  if noised:
    z_img = z_img + jnp.where(
      apply_noise, jnp.asarray(std, jnp.float32) * eps, jnp.zeros_like(z_img)
    )
  z_img = jax.lax.stop_gradient(z_img)
  mapper = nnx.merge(mapper_graphdef, mapper_params)
  out = mapper(z_img)
  preds = [out[k].astype(jnp.float32) for k in heads]
  rec = sum(mse(p, z_mask) for p in preds)
  loss = rec_weight * rec
  dice = jnp.zeros((), jnp.float32)
  if dice_weight:
    tok_params = jax.lax.stop_gradient(tok_params)
    grey = jnp.asarray(batch["mask"], jnp.float32)
    dice = heads_dice(
      tokenizer, tok_params, preds, grey, batch_decode=batch_decode, classes=classes
    )
    loss = loss + dice_weight * dice
  terms = {
    "rec": rec,
    "dice": dice,  # "noise": whether the draw said so, as gms_loss reports it
    "noise": jnp.asarray(apply_noise if eps is not None else False, jnp.float32),
  }
  return loss.astype(jnp.float32), terms


def banked_train_loss(
  mapper_graphdef: Any,
  mapper_params: Any,
  tokenizer: Any,
  tok_params: Any,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  *,
  noise_prob: float = 0.5,
  heads: Sequence[str] = HEADS,
  rec_weight: float = 1.0,
  dice_weight: float = 0.0,
  batch_decode: bool = True,
  classes: classes_lib.Classes | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """:func:`banked_loss` with the noise drawn from ``rng`` as :func:`train_loss` draws it."""
  apply, eps = sample_latent_noise(rng, batch["z_image"].shape, noise_prob)
  return banked_loss(
    mapper_graphdef,
    mapper_params,
    tokenizer,
    tok_params,
    batch,
    apply_noise=apply,
    eps=eps,
    heads=heads,
    rec_weight=rec_weight,
    dice_weight=dice_weight,
    batch_decode=batch_decode,
    classes=classes,
  )
