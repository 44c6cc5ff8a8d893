"""PyTorch SD-BNN CIFAR-10 networks, written from the authors' definitions.

An independent reference for ``resnet20_sdbnn``, ``resnet18_sdbnn`` and
``vgg_small_sdbnn`` (``cmim_jax.models.resnet`` / ``vgg``). It follows the
structure and parameter names of pingxue-hfut/SD-BNN ``cifar10/ResNet20``
(``resnet20_1w1a``), ``cifar10/ResNet18`` (``ResNet18``) and
``cifar10/VGG-Small`` (``vgg_small_1w1a``), whose binary conv is IR-Net's
``IRConv2d`` changed by SD-BNN: the input gets ``dybeta`` (a bias-free
squeeze-excitation branch, reduction 16) added before its sign, the weight
``sigmoid(alpha) * 0.01 * mean`` (per output filter, mean detached) added
before its sign, no scale factor, and both signs take the EDE gradient
``k t (1 - tanh^2(t x))`` (written here as ``k t / cosh^2(t x)``). So
``sdbnn_convert.from_official_state_dict`` reads these ``state_dict`` s as it
would read checkpoints of the official trainers (no CIFAR-10 weights are
released).

Widths (and blocks per stage) are arguments so that tests can run narrow
copies; the defaults are the official networks. ``k`` and ``t`` are plain
attributes (not buffers), as in the official code, set by
:meth:`set_schedule`. Nothing is shared with the JAX code. NCHW tensors, OIHW
kernels; ``torch.sign(0) = 0`` (random real inputs never hit 0).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torch_twins.sdbnn_imagenet_torch import SqueezeShift


class _EDESign(torch.autograd.Function):
  """Exactly ``sign(x)`` forward (the ``detach`` trick would leave values
  like 0.9999999999999999, and VGG-small's max pools would then break ties
  among the binary convs' integer outputs differently), the gradient of
  ``k tanh(t x)`` backward."""

  @staticmethod
  def forward(ctx, x, k, t):
    ctx.save_for_backward(x)
    ctx.k, ctx.t = k, t
    return torch.sign(x)

  @staticmethod
  def backward(ctx, g):
    (x,) = ctx.saved_tensors
    return g * ctx.k * ctx.t / torch.cosh(ctx.t * x) ** 2, None, None


def ede_sign(x: torch.Tensor, k: float, t: float) -> torch.Tensor:
  """``sign(x)`` whose gradient is that of ``k tanh(t x)``."""
  return _EDESign.apply(x, k, t)


class SDConv2d(nn.Conv2d):
  """SD-BNN's binary conv: ``conv(sign(x + dybeta(x)), sign(W + shift))``."""

  def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
               padding: int = 1):
    super().__init__(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
    self.alpha = nn.Parameter(torch.zeros(cout))
    self.dybeta = SqueezeShift(cin, reduction=16)
    self.k, self.t = 1.0, 1.0
    self.a_F = self.a_B = None

  def binary_weight(self):
    w = self.weight
    filter_mean = w.flatten(1).mean(dim=1).detach()
    shift = 0.01 * filter_mean * torch.sigmoid(self.alpha)
    return ede_sign(w + shift[:, None, None, None], self.k, self.t)

  def forward(self, x):
    shifted = x + self.dybeta(x)
    signed = ede_sign(shifted, self.k, self.t)
    self.a_F, self.a_B = shifted, signed.detach()
    return self._conv_forward(signed, self.binary_weight(), None)


class _Scheduled(nn.Module):
  """Sets the EDE ``(k, t)`` of every binary conv, as the official trainers
  do each epoch."""

  def set_schedule(self, k: float, t: float) -> "_Scheduled":
    for m in self.modules():
      if isinstance(m, SDConv2d):
        m.k, m.t = k, t
    return self

  def binary_convs(self):
    """``(name, SDConv2d)`` in call order."""
    return [(n, m) for n, m in self.named_modules() if isinstance(m, SDConv2d)]


class ZeroPadShortcut(nn.Module):
  """He et al.'s option A: every other pixel, ``planes // 4`` zero channels on
  each side (the official lambda; exact when the width doubles)."""

  def __init__(self, planes: int):
    super().__init__()
    self.pad = planes // 4

  def forward(self, x):
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _TwoConvs(nn.Module):
  """``conv1`` (stride ``stride``), ``bn1``, ``conv2``, ``bn2``: binary 3x3
  convs ``cin -> planes -> planes``, the parts both ResNet blocks share."""

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = SDConv2d(cin, planes, stride=stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = SDConv2d(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)


class Block20(_TwoConvs):
  """ResNet-20 block: a real shortcut around each binary conv,
  ``h = hardtanh(bn1(conv1 x) + sc(x))``, ``out = hardtanh(bn2(conv2 h) + h)``."""

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__(cin, planes, stride)
    self.shortcut = (ZeroPadShortcut(planes) if stride != 1 or cin != planes
                     else nn.Sequential())

  def forward(self, x):
    h = F.hardtanh(self.bn1(self.conv1(x)) + self.shortcut(x))
    return F.hardtanh(self.bn2(self.conv2(h)) + h)


class Block18(_TwoConvs):
  """ResNet-18 block: ``h = hardtanh(bn1(conv1 x))``,
  ``out = hardtanh(bn2(conv2 h) + sc(x))``, ``sc`` an FP 1x1 conv + BN when
  the shape changes."""

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__(cin, planes, stride)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False),
                                    nn.BatchNorm2d(planes))

  def forward(self, x):
    h = F.hardtanh(self.bn1(self.conv1(x)))
    return F.hardtanh(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNetTwin(_Scheduled):
  """FP 3x3 stem + BN + hardtanh, stages ``layer1..``, global average pool,
  ``bn2`` (BatchNorm1d), ``linear``."""

  def __init__(self, block, blocks: Sequence[int], widths: Sequence[int],
               num_classes: int = 10):
    super().__init__()
    self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    cin = widths[0]
    for s, (n, width) in enumerate(zip(blocks, widths), start=1):
      stage = []
      for b in range(n):
        stage.append(block(cin, width, 2 if (s > 1 and b == 0) else 1))
        cin = width
      setattr(self, f"layer{s}", nn.Sequential(*stage))
    self.num_stages = len(widths)
    self.bn2 = nn.BatchNorm1d(cin)
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = F.hardtanh(self.bn1(self.conv1(x)))
    for s in range(1, self.num_stages + 1):
      x = getattr(self, f"layer{s}")(x)
    # ResNet-20 pools over the whole map, ResNet-18 with a 4x4 window: the
    # same on 32x32 inputs (its last map is 4x4).
    x = F.avg_pool2d(x, x.shape[3]).flatten(1)
    return self.linear(self.bn2(x))


class VGGSmallTwin(_Scheduled):
  """``conv0`` (FP) + ``bn0``, binary ``conv1..5``, each conv -> (2x2 max pool
  after 1, 3, 5) -> BN -> hardtanh; flatten (NCHW order) -> ``fc``."""

  def __init__(self, num_classes: int = 10,
               widths: Sequence[int] = (128, 128, 256, 256, 512, 512)):
    super().__init__()
    self.conv0 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
    self.bn0 = nn.BatchNorm2d(widths[0])
    for i in range(1, 6):
      setattr(self, f"conv{i}", SDConv2d(widths[i - 1], widths[i]))
      setattr(self, f"bn{i}", nn.BatchNorm2d(widths[i]))
    self.fc = nn.Linear(widths[5] * 4 * 4, num_classes)

  def forward(self, x):
    x = F.hardtanh(self.bn0(self.conv0(x)))
    for i in range(1, 6):
      x = getattr(self, f"conv{i}")(x)
      if i % 2 == 1:
        x = F.max_pool2d(x, 2)
      x = F.hardtanh(getattr(self, f"bn{i}")(x))
    return self.fc(x.flatten(1))


def resnet20(num_classes: int = 10, widths=(16, 32, 64), blocks=(3, 3, 3)) -> ResNetTwin:
  return ResNetTwin(Block20, blocks, widths, num_classes)


def resnet18(num_classes: int = 10, widths=(64, 128, 256, 512),
             blocks=(2, 2, 2, 2)) -> ResNetTwin:
  return ResNetTwin(Block18, blocks, widths, num_classes)


def vgg_small(num_classes: int = 10,
              widths=(128, 128, 256, 256, 512, 512)) -> VGGSmallTwin:
  return VGGSmallTwin(num_classes, widths)


MODELS = {"resnet20_sdbnn": resnet20, "resnet18_sdbnn": resnet18,
          "vgg_small_sdbnn": vgg_small}
