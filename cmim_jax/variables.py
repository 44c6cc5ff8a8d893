"""Initialising a model's variables for training or inference."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from cmim_jax.layers import BINARY_ACTS


def init_variables(model: nn.Module, rng: jax.Array, x: jax.Array) -> dict[str, Any]:
  """``model.init`` in inference mode, without the sown activation taps.

  Binary layers sow their activations into :data:`~cmim_jax.layers.BINARY_ACTS`
  on every call, including ``init``; those are per-batch values, not state,
  and a train state or checkpoint holding them would carry a stale batch.

  Args:
    model: a Flax module taking ``(x, train=...)``.
    rng: initialisation key.
    x: an example input batch (its values do not matter, its shape does).

  Returns:
    The variable collections (``params``, ``batch_stats``, ...).
  """
  variables = model.init(rng, x, train=False)
  return {k: v for k, v in variables.items() if k != BINARY_ACTS}
