r"""The default configuration (defined in ``cmim_jax/default_config.py``).

  python -m cmim_jax.main --config configs/default.py --workdir runs/default

``configs/default.py:smoke`` shrinks it to a one-minute CPU run. Configs
outside the repository import ``cmim_jax.default_config`` directly.
"""

# pylint: disable=unused-import
from cmim_jax.default_config import apply_variant
from cmim_jax.default_config import get_config
