"""PyTorch SD-BNN ImageNet ResNet-18, written from the authors' definition.

An independent reference for ``cmim_jax.models.sdbnn_imagenet``. It follows
the structure and parameter names of pingxue-hfut/SD-BNN
``imagenet/birealnet.py`` (and ``imagenet/utils/se_module.py`` for the ASD
branch) so that ``sdbnn_imagenet.from_official_state_dict`` reads its
``state_dict`` as it would read the released model: flat latent weights
``binary_conv.weights`` of shape ``(n, 1)``, the WSD logits
``binary_conv.alpha``, ASD as ``binary_conv.beta.fc.{0,2}``, ``prelu``.

``binary_weights=False`` is stage 1 (real weights, the code's docstring);
``True`` is stage 2 (the code's commented-out weight binarization). Surrogate
gradients use the ``forward.detach() + f - f.detach()`` form, as the official
code does, not custom autograd functions; nothing is shared with the JAX code.
NCHW tensors; ``torch.sign(0) = 0`` (random real inputs never hit 0).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torch_twins.reactnet_torch import BiRealResNet, approx_sign


class SqueezeShift(nn.Module):
  """The ASD branch: ``sigmoid(fc2(relu(fc1(mean_hw(x)))))`` per sample and
  channel, bias-free linears, hidden width ``C // reduction``."""

  def __init__(self, channels: int, reduction: int = 8):
    super().__init__()
    self.fc = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False), nn.ReLU(),
                            nn.Linear(channels // reduction, channels, bias=False),
                            nn.Sigmoid())

  def forward(self, x):
    return self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class SelfDistributionConv(nn.Module):
  """3x3 conv (padding 1): ``x + ASD(x)``, ApproxSign, then a conv with the
  real weights (stage 1) or WSD's shifted sign (stage 2)."""

  def __init__(self, cin: int, cout: int, stride: int, binary_weights: bool):
    super().__init__()
    self.shape = (cout, cin, 3, 3)
    self.weights = nn.Parameter(torch.randn(cout * cin * 9, 1) * 0.1)
    self.alpha = nn.Parameter(torch.zeros(cout))
    self.beta = SqueezeShift(cin)
    self.stride, self.binary_weights = stride, binary_weights
    self.a_F = self.a_B = None

  def kernel(self):
    w = self.weights.reshape(self.shape)
    if not self.binary_weights:
      return w
    channel_mean = w.reshape(self.shape[0], -1).mean(dim=1).detach()[:, None, None, None]
    shifted = w + 0.01 * channel_mean * torch.sigmoid(self.alpha)[:, None, None, None]
    clipped = torch.clamp(shifted, -1.0, 1.0)
    return torch.sign(shifted).detach() + clipped - clipped.detach()

  def forward(self, x):
    shifted = x + self.beta(x)
    signed = approx_sign(shifted)
    self.a_F, self.a_B = shifted, signed
    return F.conv2d(signed, self.kernel(), stride=self.stride, padding=1)


class Unit(nn.Module):
  """``PReLU(BN(conv(x)) + shortcut(x))``."""

  def __init__(self, cin: int, cout: int, stride: int, downsample: Optional[nn.Module],
               binary_weights: bool):
    super().__init__()
    self.binary_conv = SelfDistributionConv(cin, cout, stride, binary_weights)
    self.bn1 = nn.BatchNorm2d(cout)
    self.prelu = nn.PReLU(cout)
    self.downsample = downsample

  def forward(self, x):
    out = self.bn1(self.binary_conv(x))
    out = out + (x if self.downsample is None else self.downsample(x))
    return self.prelu(out)


class SDBNNImageNetTwin(BiRealResNet):
  """SD-BNN's ResNet-18: Bi-Real's network of :class:`Unit` s."""

  def __init__(self, num_classes: int = 1000, widths: Sequence[int] = (64, 128, 256, 512),
               units: Sequence[int] = (4, 4, 4, 4), binary_weights: bool = True):
    super().__init__(
        lambda cin, cout, stride, down: Unit(cin, cout, stride, down, binary_weights),
        num_classes, widths, units)
