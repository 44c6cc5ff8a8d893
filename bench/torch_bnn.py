"""The CIFAR BNNs of ``cmim_jax.models`` written in PyTorch, for benchmarks.

Same layouts as ``cmim_jax/models/resnet.py`` (1w1a, IR-Net quantizers):

* ``resnet20``: FP 3x3 stem + BN + hardtanh, widths 16-32-64, three Bi-Real
  blocks per stage (a real shortcut around every binary conv), option-A
  (subsample + zero-padded channels) downsampling; GAP -> BN1d -> FP linear.
* ``resnet18``: FP 3x3 stem (stride 1) + BN, widths 64-128-256-512, two basic
  blocks per stage, binary 1x1 conv + BN downsampling (CMIM); GAP -> BN1d ->
  FP linear.

Every binary conv quantizes its input with the EDE sign and its latent kernel
with Libra-PB (per-filter standardisation, unbiased std, EDE sign, detached
power-of-two scale), as ``cmim_jax.binarize.ede_sign`` / ``irnet_weight``.
Tensors are NCHW, kernels OIHW (output channel first, so the per-filter
statistics reduce over dims 1..3).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class EDESign(torch.autograd.Function):
  r"""``sign(x)`` (+1 for x >= 0) with IR-Net's EDE gradient ``k t (1 - tanh(t x)^2)``."""

  @staticmethod
  def forward(ctx, x, k, t):
    ctx.save_for_backward(x, k, t)
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

  @staticmethod
  def backward(ctx, g):
    x, k, t = ctx.saved_tensors
    tx = torch.tanh(t * x)
    return g * (k * t) * (1.0 - tx * tx), None, None


def ede_schedule(progress: float, t_min: float = 0.1, t_max: float = 10.0):
  """IR-Net's ``(k, t)``: ``t = t_min 10^(p log10(t_max / t_min))``, ``k = max(1/t, 1)``."""
  t = t_min * 10.0 ** (progress * math.log10(t_max / t_min))
  return max(1.0 / t, 1.0), t


def ede_sign(x: torch.Tensor, k: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
  return EDESign.apply(x, k, t)


def irnet_weight(w: torch.Tensor, k: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
  """Libra-PB: ``sign((w - mean) / std) * 2^round(log2(mean|w'|))`` per output filter."""
  dims = tuple(range(1, w.ndim))
  w_std = (w - w.mean(dims, keepdim=True)) / w.std(dims, keepdim=True, unbiased=True)
  with torch.no_grad():
    scale = torch.exp2(torch.round(torch.log2(w_std.abs().mean(dims, keepdim=True))))
  return ede_sign(w_std, k, t) * scale


class BinaryConv2d(nn.Conv2d):
  """Conv on EDE-signed inputs with a Libra-PB kernel; ``k``, ``t`` are buffers
  the training loop sets (they change gradients only)."""

  def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1,
               padding: int = 0):
    super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                     bias=False)
    nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
    self.register_buffer("k", torch.ones(()), persistent=False)
    self.register_buffer("t", torch.ones(()), persistent=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # Zero padding is applied by conv2d after the sign, as in the JAX layer.
    return self._conv_forward(ede_sign(x, self.k, self.t),
                              irnet_weight(self.weight, self.k, self.t), None)


def _fp_conv(in_ch, out_ch):
  conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
  nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
  return conv


class BasicBlock(nn.Module):
  """``h = hardtanh(BN(bconv(x)))``, ``out = hardtanh(BN(bconv(h)) + shortcut(x))``."""

  def __init__(self, in_ch: int, out_ch: int, stride: int):
    super().__init__()
    self.conv1 = BinaryConv2d(in_ch, out_ch, 3, stride, 1)
    self.bn1 = nn.BatchNorm2d(out_ch)
    self.conv2 = BinaryConv2d(out_ch, out_ch, 3, 1, 1)
    self.bn2 = nn.BatchNorm2d(out_ch)
    self.downsample = None
    if stride != 1 or in_ch != out_ch:
      self.downsample = nn.Sequential(BinaryConv2d(in_ch, out_ch, 1, stride, 0),
                                      nn.BatchNorm2d(out_ch))

  def forward(self, x):
    h = F.hardtanh(self.bn1(self.conv1(x)))
    sc = x if self.downsample is None else self.downsample(x)
    return F.hardtanh(self.bn2(self.conv2(h)) + sc)


class BiRealBlock(nn.Module):
  """``h = hardtanh(BN(bconv(x)) + A(x))``, ``out = hardtanh(BN(bconv(h)) + h)``;
  ``A`` is option A: stride-s subsampling and zero channels split on both sides."""

  def __init__(self, in_ch: int, out_ch: int, stride: int):
    super().__init__()
    self.stride, self.extra = stride, out_ch - in_ch
    self.conv1 = BinaryConv2d(in_ch, out_ch, 3, stride, 1)
    self.bn1 = nn.BatchNorm2d(out_ch)
    self.conv2 = BinaryConv2d(out_ch, out_ch, 3, 1, 1)
    self.bn2 = nn.BatchNorm2d(out_ch)

  def forward(self, x):
    sc = x
    if self.stride != 1 or self.extra:
      sc = F.pad(x[:, :, ::self.stride, ::self.stride],
                 (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
    h = F.hardtanh(self.bn1(self.conv1(x)) + sc)
    return F.hardtanh(self.bn2(self.conv2(h)) + h)


class ResNet(nn.Module):
  """CIFAR ResNet with binary blocks, FP stem and head (GAP -> BN1d -> linear)."""

  def __init__(self, block, stage_sizes: Sequence[int], widths: Sequence[int],
               num_classes: int = 10, stem_act: bool = False):
    super().__init__()
    self.stem = nn.Sequential(_fp_conv(3, widths[0]), nn.BatchNorm2d(widths[0]),
                              *([nn.Hardtanh()] if stem_act else []))
    blocks, in_ch = [], widths[0]
    for s, (n, width) in enumerate(zip(stage_sizes, widths)):
      for b in range(n):
        blocks.append(block(in_ch, width, 2 if (s > 0 and b == 0) else 1))
        in_ch = width
    self.blocks = nn.Sequential(*blocks)
    self.head_bn = nn.BatchNorm1d(in_ch)
    self.fc = nn.Linear(in_ch, num_classes)

  def set_schedule(self, k: float, t: float) -> None:
    for m in self.modules():
      if isinstance(m, BinaryConv2d):
        m.k.fill_(k)
        m.t.fill_(t)

  def forward(self, x):
    x = self.blocks(self.stem(x))
    return self.fc(self.head_bn(x.mean((2, 3))))


def resnet20(num_classes: int = 10) -> ResNet:
  return ResNet(BiRealBlock, (3, 3, 3), (16, 32, 64), num_classes, stem_act=True)


def resnet18(num_classes: int = 10) -> ResNet:
  return ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), num_classes)


MODELS = {"resnet20": resnet20, "resnet18": resnet18}


def get_model(name: str, num_classes: int = 10) -> ResNet:
  try:
    return MODELS[name](num_classes)
  except KeyError:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def num_params(model: nn.Module) -> int:
  """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
  return sum(p.numel() for p in model.parameters())
