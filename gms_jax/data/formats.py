"""The image file formats every reader accepts (dataset folders, ``predict``), in one place:
every extension Pillow registers a reader for (``PIL.Image.registered_extensions``), less the
stub readers that need an outside plugin (BUFR, GRIB, HDF5, WMF/EMF, MPEG) and the PostScript ones
that need Ghostscript. Any case; a file that still cannot be decoded is reported, naming it."""

from __future__ import annotations


def _pillow_extensions() -> tuple[str, ...]:
  from PIL import Image, ImageFile

  Image.init()
  out = []
  for ext, fmt in Image.registered_extensions().items():
    factory = Image.OPEN.get(fmt, (None,))[0]
    if factory is None or fmt in ("EPS", "PS", "MPEG"):
      continue
    if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
      continue
    out.append(ext.lower())
  return tuple(sorted(set(out)))


COMMON_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
IMAGE_EXTENSIONS = tuple(sorted(set(COMMON_EXTENSIONS) | set(_pillow_extensions())))
