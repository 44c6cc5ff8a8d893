"""The CIFAR BNNs of ``cmim_jax.models`` written in PyTorch, for benchmarks.

Same layouts as ``cmim_jax/models/resnet.py`` and ``vgg.py`` (1w1a, IR-Net
quantizers, the defaults of ``configs/default.py``), and the same module names,
so that :func:`load_flax_variables` copies a JAX model's variables in; the
check that both then compute the same logits and gradients is
``bench/twin_parity.py``:

* ``resnet20``: FP 3x3 stem + BN + hardtanh, widths 16-32-64, three Bi-Real
  blocks per stage (a real shortcut around every binary conv), option-A
  (subsample + zero-padded channels) downsampling; GAP -> BN1d -> FP linear.
* ``resnet18``: FP 3x3 stem (stride 1) + BN, widths 64-128-256-512, two basic
  blocks per stage, binary 1x1 conv + BN downsampling (CMIM); GAP -> BN1d ->
  FP linear.
* ``vgg_small``: FP conv0, binary conv1..conv5 (128-128-M-256-256-M-512-512-M),
  each conv -> (2x2 max pool) -> BN -> hardtanh; flatten -> FP linear.

Every binary conv quantizes its input with the EDE sign and its latent kernel
with Libra-PB (per-filter standardisation, unbiased std, EDE sign, detached
power-of-two scale), as ``cmim_jax.binarize.ede_sign`` / ``irnet_weight``.
Tensors are NCHW, kernels OIHW (output channel first, so the per-filter
statistics reduce over dims 1..3).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
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


# Module attribute names follow the Flax module names of cmim_jax.models, so
# that a Flax path 'stage1_block2/conv1' is the torch path 'stage1_block2.conv1'
# and load_flax_variables needs no per-model table.


class BasicBlock(nn.Module):
  """``h = hardtanh(BN(bconv(x)))``, ``out = hardtanh(BN(bconv(h)) + shortcut(x))``."""

  def __init__(self, in_ch: int, out_ch: int, stride: int):
    super().__init__()
    self.conv1 = BinaryConv2d(in_ch, out_ch, 3, stride, 1)
    self.bn1 = nn.BatchNorm2d(out_ch)
    self.conv2 = BinaryConv2d(out_ch, out_ch, 3, 1, 1)
    self.bn2 = nn.BatchNorm2d(out_ch)
    self.downsample = self.downsample_bn = None
    if stride != 1 or in_ch != out_ch:
      self.downsample = BinaryConv2d(in_ch, out_ch, 1, stride, 0)
      self.downsample_bn = nn.BatchNorm2d(out_ch)

  def forward(self, x):
    h = F.hardtanh(self.bn1(self.conv1(x)))
    sc = x if self.downsample is None else self.downsample_bn(self.downsample(x))
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


class _Scheduled(nn.Module):
  def set_schedule(self, k: float, t: float) -> None:
    """Sets IR-Net's EDE ``(k, t)`` of every binary conv (gradients only)."""
    for m in self.modules():
      if isinstance(m, BinaryConv2d):
        m.k.fill_(k)
        m.t.fill_(t)


class ResNet(_Scheduled):
  """CIFAR ResNet with binary blocks, FP stem and head (GAP -> BN1d -> linear)."""

  def __init__(self, block, stage_sizes: Sequence[int], widths: Sequence[int],
               num_classes: int = 10, stem_act: bool = False):
    super().__init__()
    self.stem_act = stem_act
    self.stem_conv = _fp_conv(3, widths[0])
    self.stem_bn = nn.BatchNorm2d(widths[0])
    self.block_names, in_ch = [], widths[0]
    for s, (n, width) in enumerate(zip(stage_sizes, widths), start=1):
      for b in range(1, n + 1):
        name = f"stage{s}_block{b}"
        self.add_module(name, block(in_ch, width, 2 if (s > 1 and b == 1) else 1))
        self.block_names.append(name)
        in_ch = width
    self.head_bn = nn.BatchNorm1d(in_ch)
    self.fc = nn.Linear(in_ch, num_classes)

  def forward(self, x):
    x = self.stem_bn(self.stem_conv(x))
    if self.stem_act:
      x = F.hardtanh(x)
    for name in self.block_names:
      x = getattr(self, name)(x)
    return self.fc(self.head_bn(x.mean((2, 3))))


class VGGSmall(_Scheduled):
  """VGG-small 128-128-M-256-256-M-512-512-M: FP ``conv0``, binary ``conv1..5``,
  each conv -> (max pool) -> BN -> hardtanh, then an FP classifier."""

  def __init__(self, num_classes: int = 10,
               widths: Sequence[int] = (128, 128, 256, 256, 512, 512),
               pool_after: Sequence[int] = (1, 3, 5), image_size: int = 32):
    super().__init__()
    self.widths, self.pool_after = tuple(widths), tuple(pool_after)
    in_ch = 3
    for i, width in enumerate(widths):
      conv = _fp_conv(in_ch, width) if i == 0 else BinaryConv2d(in_ch, width, 3, 1, 1)
      self.add_module(f"conv{i}", conv)
      self.add_module(f"bn{i}", nn.BatchNorm2d(width))
      in_ch = width
    side = image_size // 2 ** len(self.pool_after)
    self.fc = nn.Linear(side * side * in_ch, num_classes)

  def forward(self, x):
    for i in range(len(self.widths)):
      x = getattr(self, f"conv{i}")(x)
      if i in self.pool_after:
        x = F.max_pool2d(x, 2)
      x = F.hardtanh(getattr(self, f"bn{i}")(x))
    # Flatten in (H, W, C) order, as the NHWC JAX model does, so that the
    # classifier weights are the JAX kernel transposed.
    return self.fc(x.permute(0, 2, 3, 1).flatten(1))


def resnet20(num_classes: int = 10) -> ResNet:
  return ResNet(BiRealBlock, (3, 3, 3), (16, 32, 64), num_classes, stem_act=True)


def resnet18(num_classes: int = 10) -> ResNet:
  return ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), num_classes)


def vgg_small(num_classes: int = 10) -> VGGSmall:
  return VGGSmall(num_classes)


MODELS = {"resnet20": resnet20, "resnet18": resnet18, "vgg_small": vgg_small}


def get_model(name: str, num_classes: int = 10) -> nn.Module:
  try:
    return MODELS[name](num_classes)
  except KeyError:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


# Flax leaf name -> torch attribute name (BatchNorm and Dense/Conv).
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}


def _to_torch_layout(leaf: str, value, target: torch.Tensor) -> torch.Tensor:
  t = torch.from_numpy(np.array(value))  # A copy: JAX arrays are read-only.
  if leaf == "kernel" and t.ndim == 4:
    t = t.permute(3, 2, 0, 1)  # HWIO -> OIHW
  elif leaf == "kernel" and t.ndim == 2:
    t = t.t()  # (in, out) -> (out, in)
  if tuple(t.shape) != tuple(target.shape):
    raise ValueError(f"shape {tuple(t.shape)} (from Flax {tuple(np.shape(value))}) does "
                     f"not fit torch {tuple(target.shape)}")
  return t.to(target.dtype).contiguous()


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
  targets = dict(model.named_parameters())
  targets.update((n, b) for n, b in model.named_buffers() if "running_" in n)
  return targets


def torch_layout(model: nn.Module, tree, collection: str = "params") -> dict[str, torch.Tensor]:
  """A Flax tree shaped like ``variables[collection]`` (values or gradients) as
  torch tensors in ``model``'s layout and dtype, keyed by torch name.

  Flax path ``a/b/leaf`` is torch ``a.b.<attr>`` (``kernel``/``scale`` ->
  ``weight``, ``mean``/``var`` -> ``running_mean``/``running_var``); conv
  kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in).

  Raises:
    ValueError: a Flax leaf with no torch counterpart of the right shape.
  """
  targets, out = _targets(model), {}
  for path, value in _flatten(tree):
    *modules, leaf = path
    name = ".".join([*modules, _LEAF_NAMES.get(leaf, leaf)])
    if name not in targets:
      raise ValueError(f"Flax {collection} {'/'.join(path)} has no torch counterpart "
                       f"{name!r} in {type(model).__name__}; is it the same model?")
    try:
      out[name] = _to_torch_layout(leaf, value, targets[name])
    except ValueError as e:
      raise ValueError(f"Flax {collection} {'/'.join(path)}: {e}") from None
  return out


def load_flax_variables(model: nn.Module, variables) -> nn.Module:
  """Copies a cmim_jax model's ``params`` and ``batch_stats`` into its twin.

  Layouts are converted as in :func:`torch_layout`. Every parameter and
  BatchNorm statistic of the twin must be written.

  Args:
    model: a twin from :func:`get_model` (any dtype; values are cast to it).
    variables: mapping with ``'params'`` and ``'batch_stats'`` (JAX or numpy
      arrays); other collections are ignored.

  Returns:
    ``model``, modified in place.

  Raises:
    ValueError: a Flax leaf with no torch counterpart (or of another shape), or
      a torch parameter/statistic that no Flax leaf wrote.
  """
  targets, written = _targets(model), {}
  for collection in ("params", "batch_stats"):
    written.update(torch_layout(model, variables.get(collection, {}), collection))
  missing = sorted(set(targets) - set(written))
  if missing:
    raise ValueError(f"torch {', '.join(missing)} not set by the Flax variables "
                     "(pass both 'params' and 'batch_stats' of the same model)")
  with torch.no_grad():
    for name, value in written.items():
      targets[name].copy_(value)
  return model


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if hasattr(value, "items"):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def num_params(model: nn.Module) -> int:
  """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
  return sum(p.numel() for p in model.parameters())
