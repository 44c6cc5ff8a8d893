"""Pieces shared by the CIFAR models: norms, activations, the default schedule."""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmim_jax import binarize

Array = jax.Array


def hardtanh(x: Array) -> Array:
  """``clip(x, -1, 1)``: the activation of IR-Net/CMIM/SD-BNN blocks."""
  return jnp.clip(x, -1.0, 1.0)


def batch_norm(train: bool, axis_name: Optional[str], dtype: Any) -> functools.partial:
  """BatchNorm matching PyTorch's defaults (momentum 0.1 there is 0.9 here)."""
  return functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=0.9, epsilon=1e-5, axis_name=axis_name,
                           dtype=dtype)


def resolve_schedule(schedule: Optional[Mapping[str, Any]]) -> dict[str, Any]:
  """The schedule passed on to quantizers.

  ``None`` becomes ``binarize.DEFAULT_SCHEDULE`` (k = t = 1) so that models
  can be initialised and evaluated without a schedule: the forward pass of
  every sign quantizer is independent of k and t. Training must pass the
  real schedule (``binarize.ede_schedule``), which only changes gradients.
  """
  return dict(binarize.DEFAULT_SCHEDULE if schedule is None else schedule)

