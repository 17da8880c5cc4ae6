"""``gms-jax plot WORKDIR... --out curves.png``: validation Dice against wall-clock minutes.

Reads each workdir's ``metrics.jsonl`` (written by training; every line has ``wall_time``).
The x axis is the run's own working time in minutes: each ``start`` event opens a segment at
``wall_time - setup_seconds`` (so data preparation, tokenizer loading, the latent bank and
compilation count), and a resumed run continues from where the previous segment's last record
left off (the time a run was not running does not count).

Drawn with Pillow (already a dependency; matplotlib is not installed in the project's
environment and is not needed for one line chart).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from gms_jax import errors, layout

COLORS = [
  (31, 119, 180),
  (214, 39, 40),
  (44, 160, 44),
  (255, 127, 14),
  (148, 103, 189),
  (140, 86, 75),
  (227, 119, 194),
  (127, 127, 127),
]


class PlotError(errors.GmsError, ValueError):
  """A workdir whose metrics.jsonl cannot be plotted (exit 1)."""


def read_curve(
  workdir: str | os.PathLike, metric: str = "eval/val_dice"
) -> list[tuple[float, float]]:
  """``[(minutes, value)]`` of ``metric`` in ``WORKDIR/metrics.jsonl`` (see the module doc)."""
  path = Path(workdir) / layout.METRICS_FILE
  if not path.is_file():
    raise PlotError(f"{path}: no such file (not a gms-jax training workdir?)")
  points, offset, origin, last_t, timed = [], 0.0, None, None, False
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
      except ValueError:
        raise PlotError(f"{path}:{n}: not JSON") from None
      t = r.get("wall_time")
      if t is None:
        continue
      timed = True
      if r.get("event") == "start":
        if origin is not None and last_t is not None:
          offset += last_t - origin
        origin = float(t) - float(r.get("setup_seconds", 0.0))
      if origin is None:
        origin = float(t)
      last_t = float(t)
      if metric in r:
        points.append(((offset + float(t) - origin) / 60.0, float(r[metric])))
  if not timed:
    raise PlotError(
      f"{path}: no wall_time fields (written by an older gms-jax); "
      "cannot plot against wall-clock time"
    )
  if not points:
    raise PlotError(f"{path}: no {metric!r} records")
  return points


def _nice_step(span: float, target: int = 6) -> float:
  raw = max(span, 1e-9) / target
  mag = 10 ** math.floor(math.log10(raw))
  for m in (1, 2, 2.5, 5, 10):
    if raw <= m * mag:
      return m * mag
  return 10 * mag


def _fmt(v: float) -> str:
  return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _font(size: int):
  """DejaVu Sans when the system has it (full Unicode, e.g. "224²"), else Pillow's own font."""
  from PIL import ImageFont

  try:
    return ImageFont.truetype("DejaVuSans.ttf", size)
  except OSError:
    return ImageFont.load_default(size=size)


def draw(
  curves: list[tuple[str, list[tuple[float, float]]]],
  out: str,
  *,
  ylabel: str = "validation Dice",
  title: str = "",
  width: int = 960,
  height: int = 600,
) -> None:
  """One line per ``(label, points)``; writes a PNG to ``out``."""
  from PIL import Image, ImageDraw

  font, small = _font(15), _font(13)
  img = Image.new("RGB", (width, height), "white")
  d = ImageDraw.Draw(img)
  left, right, top, bottom = 80, 30, 50 if title else 25, 60
  x0, x1, y0, y1 = left, width - right, height - bottom, top  # pixel box (y0 bottom)
  xmax = max(p[0] for _, pts in curves for p in pts)
  ys = [p[1] for _, pts in curves for p in pts]
  ylo, yhi = min(0.0, min(ys)), max(1.0, max(ys))
  xstep = _nice_step(xmax)
  xhi = math.ceil(max(xmax, 1e-9) / xstep) * xstep
  ystep = _nice_step(yhi - ylo, 5)

  def px(x, y):
    return (x0 + (x1 - x0) * x / xhi, y0 - (y0 - y1) * (y - ylo) / (yhi - ylo))

  for i in range(int(round(xhi / xstep)) + 1):  # grid and ticks
    x = i * xstep
    a, _ = px(x, ylo)
    d.line([(a, y0), (a, y1)], fill=(230, 230, 230))
    d.text((a, y0 + 6), _fmt(x), fill="black", font=small, anchor="mt")
  y = math.ceil(ylo / ystep) * ystep
  while y <= yhi + 1e-9:
    _, b = px(0, y)
    d.line([(x0, b), (x1, b)], fill=(230, 230, 230))
    d.text((x0 - 6, b), _fmt(round(y, 6)), fill="black", font=small, anchor="rm")
    y += ystep
  d.rectangle([x0, y1, x1, y0], outline="black")
  d.text(((x0 + x1) / 2, height - 18), "wall-clock minutes", fill="black", font=font, anchor="mm")
  label_img = Image.new("RGBA", (300, 24), (255, 255, 255, 0))
  ImageDraw.Draw(label_img).text((150, 12), ylabel, fill="black", font=font, anchor="mm")
  img.paste(
    label_img.rotate(90, expand=True),
    (8, int((y0 + y1) / 2 - 150)),
    label_img.rotate(90, expand=True),
  )
  if title:
    d.text(((x0 + x1) / 2, 22), title, fill="black", font=font, anchor="mm")
  for i, (label, pts) in enumerate(curves):  # lines, markers, legend
    color = COLORS[i % len(COLORS)]
    xy = [px(x, y) for x, y in sorted(pts)]
    if len(xy) > 1:
      d.line(xy, fill=color, width=2)
    for a, b in xy:
      d.ellipse([a - 3, b - 3, a + 3, b + 3], fill=color)
    ly = y1 + 14 + 20 * i
    lx = x1 - 16 - max(d.textlength(lab, font=small) for lab, _ in curves) - 32
    d.line([(lx, ly), (lx + 25, ly)], fill=color, width=3)
    d.text((lx + 32, ly), label, fill="black", font=small, anchor="lm")
  img.save(out, format="PNG")
