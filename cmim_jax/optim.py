"""Optimizers and learning-rate schedules, built from optax pieces."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant", "linear")


def kernel_mask(params, *, dense: bool = True):
  """True for every leaf called ``kernel``: weight decay hits kernels only.

  With ``dense=False`` only convolution kernels (4-d: height, width, in, out)
  are decayed, not a dense classifier's, as ReActNet's trainer does (it
  decays the parameters that are 4-d or named 'conv').
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (getattr(path[-1], "key", None) == "kernel"
                       and (dense or jnp.ndim(x) == 4)), params)


def learning_rate_schedule(*, base_lr: float, total_steps: int, warmup_steps: int,
                           schedule: str = "cosine") -> optax.Schedule:
  """Linear warm-up from 0 to ``base_lr``, then cosine/linear decay to 0 (or constant)."""
  if schedule not in SCHEDULES:
    raise ValueError(f"config.lr_schedule={schedule!r} is not one of {SCHEDULES}.")
  warmup_steps = min(warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup_steps, 1)
  if schedule == "cosine":
    decay = optax.cosine_decay_schedule(base_lr, decay_steps)
  elif schedule == "linear":
    decay = optax.linear_schedule(base_lr, 0.0, decay_steps)
  else:
    decay = optax.constant_schedule(base_lr)
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def create_optimizer(*, name: str, learning_rate: optax.Schedule, momentum: float = 0.9,
                     weight_decay: float = 0.0, decay_kernels_only: bool = True,
                     decay_dense_kernels: bool = True, decay_mask=None) -> optax.GradientTransformation:
  """SGD (momentum, PyTorch-style coupled L2), Adam (coupled L2) or AdamW.

  Args:
    name: one of ``'sgd'``, ``'adam'``, ``'adamw'``.
    learning_rate: a schedule (or float).
    momentum: SGD momentum.
    weight_decay: L2 coefficient (SGD, Adam) or decoupled decay (AdamW).
    decay_kernels_only: decay only leaves named ``kernel`` (not BatchNorm
      scales/biases, binarizer shifts or WSD parameters).
    decay_dense_kernels: with ``decay_kernels_only``, decay dense kernels too
      (False: convolution kernels only, as ReActNet's trainer).
    decay_mask: optional ``params -> bool tree``; only leaves True there are
      decayed (combined with ``decay_kernels_only``). The trainer passes one
      that leaves the objectives' heads undecayed.
  """
  mask = None
  if decay_kernels_only:
    mask = functools.partial(kernel_mask, dense=decay_dense_kernels)
  if decay_mask is not None:
    outer = mask
    def mask(params):  # pylint: disable=function-redefined
      allowed = decay_mask(params)
      if outer is None:
        return allowed
      return jax.tree.map(lambda a, b: a and b, allowed, outer(params))
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=weight_decay, mask=mask)
  if name == "sgd":
    base = optax.sgd(learning_rate, momentum=momentum or None)
  elif name == "adam":
    base = optax.adam(learning_rate)
  else:
    raise ValueError(f"config.optimizer={name!r} is not one of {OPTIMIZERS}.")
  if weight_decay == 0.0:
    return base
  return optax.chain(optax.add_decayed_weights(weight_decay, mask), base)
