"""PyTorch Bi-Real Net / ReActNet ResNet-18, written from the authors' definitions.

An independent reference for ``cmim_jax.models.birealnet``: it follows the
official PyTorch code's structure (liuzechun/Bi-Real-net
``pytorch_implementation/BiReal18_34/birealnet.py`` and liuzechun/ReActNet
``resnet/{1_step1,2_step2}/birealnet.py``) and parameter names, so that
``birealnet.from_official_state_dict`` reads its ``state_dict`` as it would
read a released checkpoint. Surrogate gradients are built the way the
official code builds them, with the ``forward.detach() + f - f.detach()``
trick, not with custom autograd functions, so the two implementations share
no gradient code.

NCHW tensors, OIHW kernels. ``torch.sign(0) = 0`` here (as in the official
code) against ``+1`` in cmim_jax; random real inputs never hit 0 exactly.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def approx_sign(x: torch.Tensor) -> torch.Tensor:
  """``sign(x)``, differentiated as Bi-Real's piecewise quadratic
  ``-1 | x^2 + 2x | 2x - x^2 | 1`` on ``x < -1 | [-1, 0) | [0, 1) | x >= 1``."""
  quad = torch.where(x < -1, -torch.ones_like(x),
                     torch.where(x < 0, x * x + 2 * x,
                                 torch.where(x < 1, 2 * x - x * x, torch.ones_like(x))))
  return torch.sign(x).detach() + quad - quad.detach()


def magnitude_sign(w: torch.Tensor) -> torch.Tensor:
  """``mean|W| sign(W)`` per output filter (detached scale), differentiated
  as ``clamp(W, -1, 1)``."""
  alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True).detach()
  clipped = w.clamp(-1.0, 1.0)
  return (alpha * torch.sign(w)).detach() + clipped - clipped.detach()


class Shift(nn.Module):
  """A learned per-channel additive bias (the official ``LearnableBias``)."""

  def __init__(self, channels: int):
    super().__init__()
    self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

  def forward(self, x):
    return x + self.bias


class Conv3x3(nn.Module):
  """Bias-free 3x3 conv (padding 1) whose kernel is binarized on every read."""

  def __init__(self, cin: int, cout: int, stride: int, binary: bool):
    super().__init__()
    self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.01)
    self.stride, self.binary = stride, binary

  def forward(self, x):
    w = magnitude_sign(self.weight) if self.binary else self.weight
    return F.conv2d(x, w, stride=self.stride, padding=1)


class Unit(nn.Module):
  """One binary conv with its own shortcut; ReActNet adds RSign's shift
  (``move0``) before the sign and RPReLU (``move1``, ``prelu``, ``move2``)
  after the add. ``a_F``/``a_B`` keep the last binarized input and its sign."""

  def __init__(self, cin: int, cout: int, stride: int, downsample: Optional[nn.Module],
               react: bool, binary_acts: bool, binary_weights: bool):
    super().__init__()
    self.react, self.binary_acts = react, binary_acts
    if react:
      self.move0 = Shift(cin)
    self.binary_conv = Conv3x3(cin, cout, stride, binary_weights)
    self.bn1 = nn.BatchNorm2d(cout)
    if react:
      self.move1 = Shift(cout)
      self.prelu = nn.PReLU(cout)
      self.move2 = Shift(cout)
    self.downsample = downsample
    self.a_F = self.a_B = None

  def forward(self, x):
    pre = self.move0(x) if self.react else x
    signed = approx_sign(pre) if self.binary_acts else pre
    self.a_F, self.a_B = pre, signed
    out = self.bn1(self.binary_conv(signed))
    out = out + (x if self.downsample is None else self.downsample(x))
    if self.react:
      out = self.move2(self.prelu(self.move1(out)))
    return out


class BiRealResNet(nn.Module):
  """Bi-Real's ResNet: 7x7 stem + BN + max-pool, ``units`` binary units per
  stage (4 for ResNet-18), GAP + FC. The first unit of stages 2.. halves the
  map; a unit that changes the shape gets the real shortcut
  ``downsample = AvgPool2d(2) -> 1x1 conv -> BN``. The twins of Bi-Real Net,
  ReActNet and SD-BNN differ only in ``make_unit(cin, cout, stride,
  downsample)``."""

  def __init__(self, make_unit: Callable[..., nn.Module], num_classes: int,
               widths: Sequence[int], units: Sequence[int]):
    super().__init__()
    self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    cin = widths[0]
    for s, (width, n) in enumerate(zip(widths, units), start=1):
      stage = []
      for u in range(n):
        stride = 2 if (s > 1 and u == 0) else 1
        down = None
        if stride != 1 or cin != width:
          down = nn.Sequential(nn.AvgPool2d(2, stride=stride),
                               nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width))
        stage.append(make_unit(cin, width, stride, down))
        cin = width
      setattr(self, f"layer{s}", nn.Sequential(*stage))
    self.num_stages = len(widths)
    self.fc = nn.Linear(cin, num_classes)

  def units(self):
    """``(stage, unit index, unit)`` in call order."""
    for s in range(1, self.num_stages + 1):
      for u, unit in enumerate(getattr(self, f"layer{s}")):
        yield s, u, unit

  def forward(self, x):
    x = self.maxpool(self.bn1(self.conv1(x)))
    for s in range(1, self.num_stages + 1):
      x = getattr(self, f"layer{s}")(x)
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BiRealNetTwin(BiRealResNet):
  """Bi-Real Net (``react=False``) or ReActNet (``react=True``) ResNet-18."""

  def __init__(self, react: bool, num_classes: int = 1000,
               widths: Sequence[int] = (64, 128, 256, 512),
               units: Sequence[int] = (4, 4, 4, 4), binary_acts: bool = True,
               binary_weights: bool = True):
    super().__init__(
        lambda cin, cout, stride, down: Unit(cin, cout, stride, down, react, binary_acts,
                                             binary_weights),
        num_classes, widths, units)
