"""PyTorch ``state_dict`` -> Flax variables: the part every converter shares.

Each model's converter (``birealnet``, ``reactnet_a``, ``sdbnn_imagenet``,
``sdbnn_convert``, ``tv_resnet``) knows where one PyTorch parameter goes in
its model (a ``place`` function); :func:`to_variables` does the rest: drops
DataParallel's ``'module.'`` prefix and the ``num_batches_tracked`` counters,
puts running statistics into ``batch_stats`` and the rest into ``params``,
and lists every name no ``place`` knows in one error.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

# PyTorch BatchNorm leaf -> Flax BatchNorm leaf.
BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
# Flax leaves that live in ``batch_stats``.
BATCH_STATS = ("mean", "var")
# What ``place`` returns for a known parameter the model has no use for.
DROP = ("drop",)

Placement = Optional[Union[tuple[str, str, np.ndarray], tuple[str]]]


def batch_norm(official: str, module: str) -> dict[str, tuple[str, str, str]]:
  """``{official.<torch leaf>: (module, flax leaf, '')}`` of one ``BatchNorm2d``."""
  return {f"{official}.{name}": (module, leaf, "") for name, leaf in BN_LEAVES.items()}


def transform(value: np.ndarray, how: str) -> np.ndarray:
  """A PyTorch array in the Flax layout.

  Args:
    value: the PyTorch array.
    how: ``'oihw'`` (conv kernel -> HWIO), ``'transpose'`` (linear weight),
      ``'channel'`` (a ``(1, C, 1, 1)`` bias -> ``(C,)``), ``'neg_channel'``
      (the same, negated) or ``''`` (as is).
  """
  if how == "oihw":
    return np.transpose(value, (2, 3, 1, 0))
  if how == "transpose":
    return value.T
  if how in ("channel", "neg_channel"):
    flat = value.reshape(-1)
    return -flat if how == "neg_channel" else flat
  if how:
    raise ValueError(f"unknown transform {how!r}; known: 'oihw', 'transpose', 'channel', "
                     "'neg_channel', ''")
  return value


def strip_module(name: str) -> str:
  """``name`` without the ``'module.'`` prefix ``nn.DataParallel`` saves."""
  return name[len("module."):] if name.startswith("module.") else name


def to_variables(state_dict: Mapping[str, Any],
                 place: Callable[[str, np.ndarray], Placement],
                 source: str) -> dict[str, dict]:
  """Flax variables of the arrays of ``state_dict``.

  Args:
    state_dict: name -> array (numpy, or anything ``np.asarray`` takes, e.g.
      CPU torch tensors), with or without the ``'module.'`` prefix.
    place: ``(name without the prefix, numpy array) -> (module path ('a/b'),
      Flax leaf, converted array)``; None for a name that is not the
      model's; :data:`DROP` for one to skip.
    source: what the parameters should be of, for the error.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` nested dicts of numpy arrays
    (``batch_stats`` only if running statistics were given).

  Raises:
    ValueError: names ``place`` does not know (all listed, as given).
  """
  variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
  unknown = []
  for key, value in state_dict.items():
    name = strip_module(key)
    if name.endswith("num_batches_tracked"):
      continue
    placed = place(name, np.asarray(value))
    if placed is None:
      unknown.append(key)
      continue
    if placed is DROP:
      continue
    module, leaf, value = placed
    node = variables["batch_stats" if leaf in BATCH_STATS else "params"]
    for part in module.split("/"):
      node = node.setdefault(part, {})
    node[leaf] = value
  if unknown:
    raise ValueError(f"not parameters of {source}: {unknown}")
  if not variables["batch_stats"]:
    del variables["batch_stats"]
  return variables
