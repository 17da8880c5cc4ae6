"""``python -m gms_jax.cli``: the ``gms-jax`` command."""

import sys

from gms_jax.cli import main

sys.exit(main())
