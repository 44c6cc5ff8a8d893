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


# Read while a step is traced; bench/step_levers.py turns it off to measure it.
MATERIALIZE_ON_CPU = True


def materialize_on_cpu(x: Array) -> Array:
  """:func:`materialized` ``x`` on the CPU backend (``MATERIALIZE_ON_CPU``), else ``x``.

  Used where it was measured to help (``bench/step_levers.py``): the block
  outputs of :class:`~cmim_jax.models.resnet.BiRealBlock`, whose shortcut
  around every conv makes the recomputed chains long.
  """
  if MATERIALIZE_ON_CPU and jax.default_backend() == "cpu":
    return materialized(x)
  return x


def materialized(x: Array) -> Array:
  """``x``, exactly, computed once and read from memory by all its consumers.

  Why: XLA:CPU (jaxlib 0.10) fuses a chain of cheap elementwise ops into
  every consumer, so a block output (BatchNorm, residual add, hardtanh) with
  several consumers (the next binary conv, the shortcut, the transposed
  copies the kernel gradients read) is recomputed in each of them, back
  through every earlier block whose output was not stored either: in
  ResNet-20 the input fusion of a stage's last conv recomputed 230 ops of
  that stage. XLA's fusion pass never duplicates a float division (it counts
  it as expensive), so dividing by a one it cannot fold away makes it
  compute the value once. ``x / 1`` is ``x`` in IEEE arithmetic and the
  cotangent ``g / 1`` is ``g``: values and gradients are unchanged, bit for
  bit (a subnormal ``x`` would become 0: XLA:CPU flushes subnormal results
  to zero, as it already does in the BatchNorm arithmetic that produces the
  inputs here). (``jax.lax.optimization_barrier`` does not do this: XLA:CPU removes
  barriers before fusion.) The one is ``1 + 0 * x[0]``: only a
  non-finite ``x[0]`` (never after a clip, unless NaN already) would change
  anything. ``bench/step_levers.py`` measures the effect.
  """
  one = 1.0 + 0.0 * jax.lax.stop_gradient(x.reshape(-1)[0])
  return x / one


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

