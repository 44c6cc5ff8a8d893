"""SD-BNN's CIFAR-10 PyTorch weights as variables of the ``*_sdbnn`` models.

pingxue-hfut/SD-BNN trains three CIFAR-10 networks (``cifar10/ResNet20``,
``cifar10/ResNet18``, ``cifar10/VGG-Small``; it releases no CIFAR-10
weights); this module maps their PyTorch ``state_dict`` onto
``resnet20_sdbnn``, ``resnet18_sdbnn`` and ``vgg_small_sdbnn``. Their binary
conv (``IRConv2d``) holds ``weight`` (OIHW), WSD's ``alpha`` (``a`` here) and
ASD's ``dybeta.fc.{0,2}.weight`` (``input_shift/fc{1,2}`` here); ``k`` and
``t`` are not saved. Parity with a PyTorch twin of the official code:
``tests/test_models_sdbnn_cifar.py``.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

import numpy as np

from cmim_jax.models import torch_convert

ARCHS = ("resnet20_sdbnn", "resnet18_sdbnn", "vgg_small_sdbnn")
_SOURCES = {"resnet20_sdbnn": "cifar10/ResNet20/resnet.py (resnet20_1w1a)",
            "resnet18_sdbnn": "cifar10/ResNet18/resnet.py (ResNet18)",
            "vgg_small_sdbnn": "cifar10/VGG-Small/vgg.py (vgg_small_1w1a)"}
# Official leaf -> (sub-module, leaf, transform).
_BN = {name: ("", leaf, "") for name, leaf in torch_convert.BN_LEAVES.items()}
_BINARY_CONV = {"weight": ("", "kernel", "oihw"), "alpha": ("", "a", ""),
                "dybeta.fc.0.weight": ("/input_shift/fc1", "kernel", "transpose"),
                "dybeta.fc.2.weight": ("/input_shift/fc2", "kernel", "transpose")}
_FP_CONV = {"weight": ("", "kernel", "oihw")}
_LINEAR = {"weight": ("", "kernel", "transpose"), "bias": ("", "bias", "")}


def _module_of(arch: str, module: str) -> Optional[tuple[str, dict]]:
  """The library module and leaf table of an official module name, or None."""
  if arch == "vgg_small_sdbnn":
    m = re.fullmatch(r"(conv|bn)([0-5])", module)
    if m:
      kind = _BN if m.group(1) == "bn" else (_FP_CONV if m.group(2) == "0" else _BINARY_CONV)
      return module, kind
    return ("fc", {**_LINEAR, "weight": ("", "kernel", "nchw_flat")}) if module == "fc" else None
  top = {"conv1": ("stem_conv", _FP_CONV), "bn1": ("stem_bn", _BN), "bn2": ("head_bn", _BN),
         "linear": ("fc", _LINEAR)}
  if module in top:
    return top[module]
  stages = 3 if arch == "resnet20_sdbnn" else 4
  m = re.fullmatch(r"layer([1-%d])\.(\d+)\.(conv[12]|bn[12]|shortcut\.[01])" % stages, module)
  if not m:
    return None
  block = f"stage{m.group(1)}_block{int(m.group(2)) + 1}/"
  part = m.group(3)
  if part.startswith("shortcut"):  # option A (ResNet-20) has no weights
    if arch == "resnet20_sdbnn":
      return None
    return ((block + "downsample", _FP_CONV) if part.endswith("0")
            else (block + "downsample_bn", _BN))
  return block + part, _BN if part.startswith("bn") else _BINARY_CONV


def _transform(value: np.ndarray, how: str, channels: int) -> np.ndarray:
  if how == "nchw_flat":
    # PyTorch flattens the last feature map as (C, H, W), Flax as (H, W, C).
    side = math.isqrt(value.shape[1] // channels)
    if side * side * channels != value.shape[1]:
      raise ValueError(f"fc.weight {value.shape} is not a square map of {channels} channels")
    out = value.reshape(value.shape[0], channels, side, side)
    return np.transpose(out, (2, 3, 1, 0)).reshape(-1, value.shape[0])
  return torch_convert.transform(value, how)


def from_official_state_dict(state_dict: Mapping[str, Any], arch: str) -> dict[str, dict]:
  """Flax variables of ``arch`` from an official SD-BNN CIFAR-10 ``state_dict``.

  Accepts the keys with or without DataParallel's ``'module.'`` prefix and
  skips ``num_batches_tracked``. Block ``i`` (0-based) of ``layer{s}`` is
  ``stage{s}_block{i+1}``. The map is linear (transposes and, for VGG-small's
  classifier, a reordering of its inputs), so it also converts gradients.

  Args:
    state_dict: name -> array (numpy or CPU torch tensors), e.g.
      ``torch.load(path, map_location='cpu')['state_dict']`` of a checkpoint
      the official trainers saved.
    arch: one of ``ARCHS``.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` nested dicts of numpy arrays.

  Raises:
    ValueError: an unknown ``arch``, or keys that are not parameters of its
      official network (all listed).
  """
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
  # VGG-small's classifier reads the last conv's channels (bn5's width).
  channels = next((np.shape(v)[0] for k, v in state_dict.items()
                   if torch_convert.strip_module(k) == "bn5.weight"), 0)

  def place(name: str, value: np.ndarray):
    found, spec, parts = None, None, name.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # longest module name first
      module, leaf = ".".join(parts[:cut]), ".".join(parts[cut:])
      found = _module_of(arch, module)
      if found and leaf in found[1]:
        spec = found[1][leaf]
        break
    if spec is None:
      return None
    sub, leaf, how = spec
    if how == "nchw_flat" and not channels:
      raise ValueError("converting fc.weight of vgg_small_sdbnn needs bn5.weight in the state_dict")
    return found[0] + sub, leaf, _transform(value, how, channels)

  return torch_convert.to_variables(state_dict, place, f"SD-BNN's {_SOURCES[arch]}")
