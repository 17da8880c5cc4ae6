"""The classes of a segmentation task and how their masks pass through the frozen tokenizer
(docs/METHOD.md §7). Pure math: no I/O (the labels of a folder are read by
:mod:`gms_jax.data.labels`).

A task has ``C = num_classes`` classes, 0 the background. Masks are label maps: float (B,S,S)
arrays of class ids (a binary task's {0,1} mask is the label map of C = 2). Two codings of the
``K = C - 1`` foreground classes (``config.mask_coding``):

``"channels"`` (the default): each foreground class's binary mask is encoded on its own, as the
  binary method encodes its mask (grey -> RGB); the mask latent is the K latents concatenated on
  channels (K*L channels), the mapper predicts all of them, each is decoded to its class's grey
  probability map. A pixel takes the foreground class of highest probability when that probability
  is > 0.5 (:data:`THRESHOLD`), background otherwise. For C = 2 this is the binary method exactly.
``"palette"``: the label map is painted with one colour per class (:data:`PALETTE`; background
  black) and encoded as one RGB image (L channels, the binary mapper's size); the decoded image's
  pixels take the nearest colour. The Dice term uses the soft assignment
  ``softmax(-|rgb - colour_c|^2 / PALETTE_TEMPERATURE)`` over the C colours.

The loss (:mod:`gms_jax.loss`) is the paper's with the classes averaged: latent MSE over all
mask-latent channels (= the mean of the per-class MSEs) + the mean over foreground classes of
MONAI's Dice of the class's decoded probability against its binary mask. For C = 2 both are the
binary terms exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CODINGS = ("channels", "palette")
THRESHOLD = 0.5  # docs/METHOD.md §4: a class's decoded probability > 0.5
# Class colours of the palette coding, RGB in [0,1]: background black, class 1 white (the binary
# mask's colours), then the other corners of the RGB cube; at most len(PALETTE) classes.
PALETTE = (
  (0.0, 0.0, 0.0),
  (1.0, 1.0, 1.0),
  (1.0, 0.0, 0.0),
  (0.0, 0.0, 1.0),
  (0.0, 1.0, 0.0),
  (1.0, 1.0, 0.0),
  (1.0, 0.0, 1.0),
  (0.0, 1.0, 1.0),
)
PALETTE_TEMPERATURE = 0.05  # soft nearest colour for the Dice term (squared RGB distance units)
PALETTE_FLOOR = 1e-3  # scores below it are 0 (see Classes.scores)
MAX_CLASSES = 255  # label maps are 8-bit


@dataclasses.dataclass(frozen=True)
class Classes:
  """``num_classes`` (background included, >= 2), the mask ``coding`` and the class ``names``
  (by id; may be empty)."""

  num_classes: int = 2
  coding: str = "channels"
  names: tuple[str, ...] = ()

  def __post_init__(self):
    c = int(self.num_classes)
    if not 2 <= c <= MAX_CLASSES:
      raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {c}")
    if self.coding not in CODINGS:
      raise ValueError(f"unknown mask coding {self.coding!r}; one of {', '.join(CODINGS)}")
    if self.coding == "palette" and c > len(PALETTE):
      raise ValueError(f"the palette coding has {len(PALETTE)} colours; {c} classes need more")
    if self.names and len(self.names) != c:
      raise ValueError(f"{len(self.names)} class names for {c} classes")
    object.__setattr__(self, "num_classes", c)
    object.__setattr__(self, "names", tuple(str(n) for n in self.names))

  # ------------------------------------------------------------------- facts
  @property
  def binary(self) -> bool:
    return self.num_classes == 2

  @property
  def num_fg(self) -> int:
    """K, the foreground classes."""
    return self.num_classes - 1

  @property
  def effective_coding(self) -> str:
    """The coding in use: a binary task always codes its mask as the paper does."""
    return "channels" if self.binary else self.coding

  @property
  def num_mask_images(self) -> int:
    """Images the tokenizer encodes per mask: K (channels) or 1."""
    return self.num_fg if self.effective_coding == "channels" else 1

  def mask_latent_channels(self, latent_channels: int) -> int:
    """The mapper's output channels: ``num_mask_images * latent_channels``."""
    return self.num_mask_images * int(latent_channels)

  def class_names(self) -> tuple[str, ...]:
    return self.names or tuple(["background"] + [f"class{c}" for c in range(1, self.num_classes)])

  def describe(self) -> str:
    if self.binary:
      return "binary (background / foreground)"
    return f"{self.num_classes} classes ({', '.join(self.class_names())}), {self.coding} coding"

  # ------------------------------------------------------------------- training targets
  def mask_images(self, labels: jax.Array) -> list[jax.Array]:
    """(B,S,S) label maps -> the (B,S,S,3) images in [0,1] the tokenizer encodes for them."""
    labels = jnp.asarray(labels, jnp.float32)
    if self.effective_coding == "channels":
      return [
        jnp.repeat(self.fg_mask(labels, c)[..., None], 3, axis=-1)
        for c in range(1, self.num_classes)
      ]
    palette = jnp.asarray(PALETTE[: self.num_classes], jnp.float32)
    return [palette[jnp.clip(labels.astype(jnp.int32), 0, self.num_classes - 1)]]

  def fg_mask(self, labels: jax.Array, c: int) -> jax.Array:
    """The binary mask of class ``c`` (float32); for a binary task and c = 1 the mask itself."""
    labels = jnp.asarray(labels, jnp.float32)
    if self.binary:
      return labels
    return (labels == c).astype(jnp.float32)

  def split_latent(self, z: jax.Array) -> list[jax.Array]:
    """A mask latent of :meth:`mask_latent_channels` channels -> the latents to decode."""
    n = self.num_mask_images
    if n == 1:
      return [z]
    return jnp.split(z, n, axis=-1)

  def decode(self, tokenizer: Any, tok_params: Any, z: jax.Array) -> jax.Array:
    """One decoder call on latents of the coding: grey masks (channels) or RGB (palette)."""
    if self.effective_coding == "channels":
      return tokenizer.decode_mask(tok_params, z)
    return tokenizer.decode(tok_params, z)

  def scores(self, decoded: Sequence[jax.Array]) -> jax.Array:
    """The decoded parts of one mask latent -> class scores: (B,S,S) foreground probability for a
    binary task, else (B,S,S,K) per foreground class in [0,1]."""
    if self.binary:
      return decoded[0]
    if self.effective_coding == "channels":
      return jnp.stack(list(decoded), axis=-1)
    rgb = decoded[0]
    palette = jnp.asarray(PALETTE[: self.num_classes], jnp.float32)
    d2 = jnp.sum(jnp.square(rgb[..., None, :] - palette), axis=-1)  # (B,S,S,C)
    p = jax.nn.softmax(-d2 / PALETTE_TEMPERATURE, axis=-1)[..., 1:]
    # The softmax never reaches 0 (a pixel of another colour keeps ~2e-9): summed over an image
    # that floor would dominate MONAI's 1e-5 smoothing and give an absent class a Dice loss of
    # ~0.9 even for a perfect decode. Below PALETTE_FLOOR a score is 0.
    return jnp.where(p < PALETTE_FLOOR, 0.0, p)

  def scores_from_latent(self, tokenizer: Any, tok_params: Any, z: jax.Array) -> jax.Array:
    """A predicted mask latent -> :meth:`scores` (the parts decoded in one call)."""
    from gms_jax.loss import deinterleave, interleave

    parts = self.split_latent(z)
    if len(parts) == 1:
      return self.scores([self.decode(tokenizer, tok_params, parts[0])])
    return self.scores(
      deinterleave(self.decode(tokenizer, tok_params, interleave(parts)), len(parts))
    )

  # ------------------------------------------------------------------- predictions
  def labels(self, scores: Any) -> np.ndarray:
    """:meth:`scores` (numpy, any leading axes) -> uint8 label maps: binary ``p > 0.5``;
    channels: the most probable foreground class where its probability is > 0.5, else 0;
    palette: the nearest colour (argmax over background and the classes)."""
    s = np.asarray(scores, np.float32)
    if self.binary:
      return (s > THRESHOLD).astype(np.uint8)
    best = np.argmax(s, axis=-1)
    top = np.take_along_axis(s, best[..., None], axis=-1)[..., 0]
    if self.effective_coding == "channels":
      return np.where(top > THRESHOLD, best + 1, 0).astype(np.uint8)
    background = 1.0 - np.sum(s, axis=-1)
    return np.where(top > background, best + 1, 0).astype(np.uint8)

  def score_channels(self) -> int:
    """Trailing channels of :meth:`scores` (0 = none: binary (B,S,S))."""
    return 0 if self.binary else self.num_fg


def from_config(config: Any) -> Classes:
  """The :class:`Classes` of a config (``data.num_classes``: 0 = binary until resolved from the
  data; ``data.class_names``; ``mask_coding``). Keys absent from older configs mean binary."""
  data = config.data if hasattr(config, "data") else config["data"]
  get = data.get if hasattr(data, "get") else (lambda k, d=None: data[k] if k in data else d)
  n = int(get("num_classes", 0) or 0)
  names = tuple(get("class_names", ()) or ())
  coding = str(config.get("mask_coding", "channels") or "channels").lower()
  return Classes(num_classes=max(n, 2), coding=coding, names=names if n > 2 else ())


def class_colours(num_classes: int) -> np.ndarray:
  """(C,3) uint8 overlay colours: background black, class 1 green (the binary overlays'), then
  red, blue, yellow, magenta, cyan, ... (cycled)."""
  base = [
    (0, 0, 0),
    (0, 200, 0),
    (220, 40, 40),
    (40, 90, 230),
    (230, 200, 30),
    (200, 50, 200),
    (30, 200, 200),
    (240, 140, 30),
  ]
  return np.asarray(
    [base[c if c < len(base) else 1 + (c - 1) % (len(base) - 1)] for c in range(num_classes)],
    np.uint8,
  )
