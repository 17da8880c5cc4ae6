"""Test and benchmark support that is not part of the model code: PyTorch references
(:mod:`gms_jax.testing.torch_refs`, needs torch) shared by ``tests/`` and ``benchmarks/``."""
