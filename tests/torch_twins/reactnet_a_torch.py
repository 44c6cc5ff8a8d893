"""PyTorch ReActNet-A, written from the authors' definition.

An independent reference for ``cmim_jax.models.reactnet_a``. It follows the
structure and the parameter names of liuzechun/ReActNet ``mobilenet/``
(``1_step1`` and ``2_step2``: ``feature.{i}`` blocks with ``move11``,
``binary_3x3``, ``bn1``, ``move12``/``prelu1``/``move13``, ``move21``, then
``binary_pw`` + ``bn2`` or ``binary_pw_down{1,2}`` + ``bn2_{1,2}``, and
``move22``/``prelu2``/``move23``), so that
``reactnet_a.from_official_state_dict`` reads its ``state_dict`` as it would
read a released checkpoint. As there, a binary-weight conv (step 2) keeps its
latent kernel as one flat ``weights`` column and a real-weight conv (step 1)
a 4-D ``weight``. Surrogate gradients come from the shared helpers of
``reactnet_torch`` (the ``detach`` trick of the official code), not from
custom autograd functions.

NCHW tensors, OIHW kernels; ``torch.sign(0) = 0`` (random inputs never hit 0).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torch_twins.reactnet_torch import Shift, approx_sign, magnitude_sign

WIDTHS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
STRIDES = (2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)


class BinConv(nn.Module):
  """Bias-free square conv (``c -> c``) on already-binarized inputs."""

  def __init__(self, c: int, k: int, stride: int, binary: bool):
    super().__init__()
    self.shape, self.stride, self.pad, self.binary = (c, c, k, k), stride, k // 2, binary
    if binary:  # HardBinaryConv of step 2: one flat column.
      self.weights = nn.Parameter(torch.randn(c * c * k * k, 1) * 0.01)
    else:  # A plain nn.Conv2d in step 1.
      self.weight = nn.Parameter(torch.randn(self.shape) * 0.01)

  def forward(self, x):
    w = magnitude_sign(self.weights.view(self.shape)) if self.binary else self.weight
    return F.conv2d(x, w, stride=self.stride, padding=self.pad)


class Block(nn.Module):
  """One ReActNet-A block; keeps ``a_F``/``a_B`` of both binarized inputs."""

  def __init__(self, cin: int, cout: int, stride: int, binary_acts: bool,
               binary_weights: bool):
    super().__init__()
    assert cout in (cin, 2 * cin)
    self.stride, self.double, self.binary_acts = stride, cout != cin, binary_acts
    self.move11 = Shift(cin)
    self.binary_3x3 = BinConv(cin, 3, stride, binary_weights)
    self.bn1 = nn.BatchNorm2d(cin)
    self.move12, self.prelu1, self.move13 = Shift(cin), nn.PReLU(cin), Shift(cin)
    self.move21 = Shift(cin)
    if self.double:
      self.binary_pw_down1 = BinConv(cin, 1, 1, binary_weights)
      self.binary_pw_down2 = BinConv(cin, 1, 1, binary_weights)
      self.bn2_1, self.bn2_2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cin)
    else:
      self.binary_pw = BinConv(cin, 1, 1, binary_weights)
      self.bn2 = nn.BatchNorm2d(cin)
    self.move22, self.prelu2, self.move23 = Shift(cout), nn.PReLU(cout), Shift(cout)
    self.acts = {}

  def _sign(self, x, key):
    out = approx_sign(x) if self.binary_acts else x
    self.acts[key] = (x, out)
    return out

  def forward(self, x):
    y = self.bn1(self.binary_3x3(self._sign(self.move11(x), "3x3")))
    shortcut = F.avg_pool2d(x, 2, 2) if self.stride == 2 else x
    h = self.move13(self.prelu1(self.move12(y + shortcut)))
    b = self._sign(self.move21(h), "1x1")
    if self.double:
      out = torch.cat([self.bn2_1(self.binary_pw_down1(b)) + h,
                       self.bn2_2(self.binary_pw_down2(b)) + h], dim=1)
    else:
      out = self.bn2(self.binary_pw(b)) + h
    return self.move23(self.prelu2(self.move22(out)))


class Stem(nn.Module):
  """FP 3x3 conv + BN, no activation (the official ``firstconv3x3``)."""

  def __init__(self, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(3, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)

  def forward(self, x):
    return self.bn1(self.conv1(x))


class ReActNetATwin(nn.Module):
  """``feature`` = stem + blocks, then global average pool + ``fc``."""

  def __init__(self, num_classes: int = 1000, widths: Sequence[int] = WIDTHS,
               strides: Sequence[int] = STRIDES, binary_acts: bool = True,
               binary_weights: bool = True):
    super().__init__()
    blocks = [Stem(widths[0], strides[0])]
    for cin, cout, s in zip(widths[:-1], widths[1:], strides[1:]):
      blocks.append(Block(cin, cout, s, binary_acts, binary_weights))
    self.feature = nn.ModuleList(blocks)
    self.fc = nn.Linear(widths[-1], num_classes)

  def forward(self, x):
    for block in self.feature:
      x = block(x)
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
