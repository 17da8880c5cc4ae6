"""Names of the entries in a gms-jax workdir, in one place.

No imports on purpose: light commands (``gms-jax plot``) read workdirs without importing jax/orbax."""

CONFIG_FILE = "config.json"
CHECKPOINT_SUBDIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
BANK_SUBDIR = "bank"  # the fast recipe's latent bank, unless config.bank.dir names another
LOCK_FILE = ".gms-jax.lock"  # held by the running train / import (gms_jax.lock)
