"""Data: GMS-layout folders -> tfds ArrayRecord (builder) -> grain batches (pipeline).

Modules: ``checks`` (reading/validating files, ``gms-jax check-data``), ``splits`` (split
files, ratio splits, validation carve-out), ``builder`` (tfds builder, ``prepare``), ``augment``
(the GMS albumentations recipe), ``pipeline`` (grain). Nothing is imported here, so
``import gms_jax.data`` stays cheap (tfds, albumentations and grain are heavy imports).
"""

__all__ = ["DataError"]


def __getattr__(name):
  if name == "DataError":
    from gms_jax.data.checks import DataError

    return DataError
  raise AttributeError(f"module 'gms_jax.data' has no attribute {name!r}")
