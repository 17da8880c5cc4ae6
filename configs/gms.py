"""The training configs, for ``--config configs/gms.py:NAME`` from a checkout.

The configs live in the package (``gms_jax/configs/gms.py``), so an installed ``gms-jax`` finds
them by bare name (``--config smoke``); this file re-exports them for the path form.
"""

from gms_jax.configs.gms import *  # noqa: F401,F403  pylint: disable=wildcard-import,unused-wildcard-import
from gms_jax.configs.gms import get_config  # noqa: F401
