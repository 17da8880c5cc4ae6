"""PyTorch reference modules for parity tests, in the original's style (docs/METHOD.md §2, §1.2).

They are deliberately independent of the Flax code: NCHW, torch modules, and the *official*
attribute names, so ``state_dict()`` yields exactly the keys of the published checkpoints:

* :class:`ResAttnUNet_DS` — the GMS latent mapper (docs/METHOD.md §2).  Keys: ``input_blocks.*``,
  ``conv1_0.resblock.act1.weight`` (PReLU, the same tensor as ``conv1_0.resblock.conv1.1.weight``),
  ``conv1_0.resblock.conv1.{0,2}.*`` (GroupNorm, conv), ``...skip_connection.weight``,
  ``conv1_0.attention.{norm,q,k,v,proj_out}.*``, ``convds{0..3}.{0,2}.*``.
  ``forward(x)`` returns ``{"level3", "level2", "level1", "out"}`` (NCHW).
* :func:`tae_encoder` / :func:`tae_decoder` — the TAESD-family tiny autoencoder (METHOD §1.2) as
  ``nn.Sequential`` so the keys are the checkpoint's indices (``0.weight``, ``11.pool.1.bias``...).
  Encoder: image in [0,1] -> latent; decoder: latent -> image in about [0,1] (not clamped).
* :func:`randomize_` — fills every parameter (GroupNorm affine, PReLU slopes, biases included) with
  random values so a parity test exercises all of them.

Importing this module needs torch; tests should ``pytest.importorskip("torch")`` first.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# ----------------------------------------------------------------------------- GMS mapper (§2)


def Normalize(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=16, num_channels=channels, eps=1e-6, affine=True)


class SpatialSelfAttention(nn.Module):
  """GN -> q,k,v 1x1 convs -> softmax(q k^T / sqrt(c)) over H*W -> weighted v -> proj_out, residual."""

  def __init__(self, channels: int):
    super().__init__()
    self.norm = Normalize(channels)
    self.q = nn.Conv2d(channels, channels, 1)
    self.k = nn.Conv2d(channels, channels, 1)
    self.v = nn.Conv2d(channels, channels, 1)
    self.proj_out = nn.Conv2d(channels, channels, 1)

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x)
    q = self.q(y).flatten(2)  # b c n
    k = self.k(y).flatten(2)
    v = self.v(y).flatten(2)
    attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=-1)  # b n(query) n(key)
    out = torch.bmm(v, attn.transpose(1, 2)).view(
      b, c, h, w
    )  # out[:, :, i] = sum_j attn[i, j] v[:, :, j]
    return x + self.proj_out(out)


class ResBlock(nn.Module):
  """As the original: the PReLU modules are attributes AND Sequential members (aliased keys)."""

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.act1 = nn.PReLU()
    self.act2 = nn.PReLU()
    self.conv1 = nn.Sequential(
      Normalize(in_channels), self.act1, nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=True)
    )
    self.conv2 = nn.Sequential(
      Normalize(out_channels), self.act2, nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=True)
    )
    self.skip_connection = (
      nn.Identity()
      if in_channels == out_channels
      else nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False)
    )

  def forward(self, x):
    return self.skip_connection(x) + self.conv2(self.conv1(x))


class ResAttBlock(nn.Module):
  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.resblock = ResBlock(in_channels, out_channels)
    self.attention = SpatialSelfAttention(out_channels)

  def forward(self, x):
    return self.attention(self.resblock(x))


def _head(channels: int, out_channels: int) -> nn.Sequential:
  return nn.Sequential(
    Normalize(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, 1, 1, bias=False)
  )


class ResAttnUNet_DS(nn.Module):
  """The GMS latent mapper, NCHW; returns a dict of four latents."""

  def __init__(self, in_channel=4, out_channels=4, ch=32, ch_mult=(1, 2, 4, 4)):
    super().__init__()
    m = ch_mult
    self.input_blocks = nn.Conv2d(in_channel, ch, 3, 1, 1, bias=True)
    self.conv1_0 = ResAttBlock(ch, ch * m[0])
    self.conv2_0 = ResAttBlock(ch * m[0], ch * m[1])
    self.conv3_0 = ResAttBlock(ch * m[1], ch * m[2])
    self.conv4_0 = ResAttBlock(ch * m[2], ch * m[3])
    self.conv3_1 = ResAttBlock(ch * (m[2] + m[3]), ch * m[2])
    self.conv2_2 = ResAttBlock(ch * (m[1] + m[2]), ch * m[1])
    self.conv1_3 = ResAttBlock(ch * (m[0] + m[1]), ch * m[0])
    self.conv0_4 = ResAttBlock(ch * (1 + m[0]), ch)
    self.convds3 = _head(ch * m[2], out_channels)
    self.convds2 = _head(ch * m[1], out_channels)
    self.convds1 = _head(ch * m[0], out_channels)
    self.convds0 = _head(ch, out_channels)
    for mod in self.modules():
      if isinstance(mod, nn.Conv2d):
        nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="leaky_relu")
        if mod.bias is not None:
          nn.init.zeros_(mod.bias)

  def forward(self, x):
    x0 = self.input_blocks(x)
    x1 = self.conv1_0(x0)
    x2 = self.conv2_0(x1)
    x3 = self.conv3_0(x2)
    x4 = self.conv4_0(x3)
    x3_1 = self.conv3_1(torch.cat([x3, x4], dim=1))
    x2_2 = self.conv2_2(torch.cat([x2, x3_1], dim=1))
    x1_3 = self.conv1_3(torch.cat([x1, x2_2], dim=1))
    x0_4 = self.conv0_4(torch.cat([x0, x1_3], dim=1))
    return {
      "level3": self.convds3(x3_1),
      "level2": self.convds2(x2_2),
      "level1": self.convds1(x1_3),
      "out": self.convds0(x0_4),
    }


# ----------------------------------------------------------------------------- TAE family (§7)


def _conv(n_in, n_out, **kw):
  return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class Clamp(nn.Module):
  def forward(self, x):
    return torch.tanh(x / 3) * 3


class Block(nn.Module):
  """conv-ReLU-conv-ReLU-conv + skip, ReLU; optional midblock-GN ``pool`` added to the input first."""

  def __init__(self, n_in: int, n_out: int, use_midblock_gn: bool = False):
    super().__init__()
    self.conv = nn.Sequential(
      _conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
    )
    self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
    self.fuse = nn.ReLU()
    self.pool = None
    if use_midblock_gn:
      n_gn = 4 * n_in
      self.pool = nn.Sequential(
        nn.Conv2d(n_in, n_gn, 1, bias=False),
        nn.GroupNorm(4, n_gn),
        nn.ReLU(),
        nn.Conv2d(n_gn, n_in, 1, bias=False),
      )

  def forward(self, x):
    if self.pool is not None:
      x = x + self.pool(x)
    return self.fuse(self.conv(x) + self.skip(x))


def tae_encoder(latent_channels: int = 4, use_midblock_gn: bool = False) -> nn.Sequential:
  gn = dict(use_midblock_gn=use_midblock_gn)
  return nn.Sequential(
    _conv(3, 64),
    Block(64, 64),
    _conv(64, 64, stride=2, bias=False),
    Block(64, 64),
    Block(64, 64),
    Block(64, 64),
    _conv(64, 64, stride=2, bias=False),
    Block(64, 64),
    Block(64, 64),
    Block(64, 64),
    _conv(64, 64, stride=2, bias=False),
    Block(64, 64, **gn),
    Block(64, 64, **gn),
    Block(64, 64, **gn),
    _conv(64, latent_channels),
  )


def tae_decoder(latent_channels: int = 4, use_midblock_gn: bool = False) -> nn.Sequential:
  gn = dict(use_midblock_gn=use_midblock_gn)
  return nn.Sequential(
    Clamp(),
    _conv(latent_channels, 64),
    nn.ReLU(),
    Block(64, 64, **gn),
    Block(64, 64, **gn),
    Block(64, 64, **gn),
    nn.Upsample(scale_factor=2),
    _conv(64, 64, bias=False),
    Block(64, 64),
    Block(64, 64),
    Block(64, 64),
    nn.Upsample(scale_factor=2),
    _conv(64, 64, bias=False),
    Block(64, 64),
    Block(64, 64),
    Block(64, 64),
    nn.Upsample(scale_factor=2),
    _conv(64, 64, bias=False),
    Block(64, 64),
    _conv(64, 3),
  )


# ----------------------------------------------------------------------------- helpers


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
  """Randomises every parameter in place (conv weights jittered; biases, GN affines, PReLU slopes drawn)."""
  g = torch.Generator().manual_seed(seed)
  for name, p in module.named_parameters():
    if name.endswith("weight") and p.ndim == 4:
      p.add_(scale * p.std().clamp_min(1e-3) * torch.randn(p.shape, generator=g))
    elif p.ndim == 1 and p.numel() == 1:  # PReLU slope
      p.copy_(0.05 + 0.5 * torch.rand(p.shape, generator=g))
    elif name.endswith("weight"):  # GroupNorm scale
      p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    else:  # biases, GroupNorm shift
      p.copy_(0.1 * torch.randn(p.shape, generator=g))
  return module


def nhwc_to_nchw(x) -> torch.Tensor:
  """numpy/JAX NHWC array -> float32 torch NCHW tensor."""
  return torch.from_numpy(np.array(x, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()


def nchw_to_nhwc(t) -> np.ndarray:
  """torch NCHW tensor -> numpy NHWC array."""
  return t.detach().permute(0, 2, 3, 1).cpu().numpy()
