"""CIFAR ResNets with binary convolutions (32x32 inputs).

* ResNet-18 (CMIM / IR-Net / SD-BNN layout): FP 3x3 stem (stride 1) + BN,
  widths 64-128-256-512, two :class:`BasicBlock` per stage; head GAP ->
  BatchNorm -> FP dense.
* ResNet-20 (IR-Net, Bi-Real style): FP stem + BN + hardtanh, widths 16-32-64,
  three :class:`BiRealBlock` per stage, a real-valued shortcut around every
  binary conv, option-A (subsample + zero-pad) downsampling.

The stem and the classifier stay full precision. Binary and full-precision
twins share this code: the FP twin uses the ``'identity'`` quantizers.

Module names (the CMIM taps refer to them): ``stem_conv``, ``stem_bn``,
``stage{s}_block{b}`` (1-based) holding ``conv1``, ``bn1``, ``conv2``,
``bn2`` and, where the shortcut has weights, ``downsample`` and
``downsample_bn``; then ``head_bn`` and ``fc``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmim_jax import binarize, layers
from cmim_jax.models import common

Array = jax.Array
ModuleDef = Any
SHORTCUTS = ("binary", "real", "option_a")


def _shortcut(x: Array, features: int, strides: int, kind: str, conv: ModuleDef,
              norm: ModuleDef, dtype: Any, schedule: Mapping[str, Any]) -> Array:
  """The block's shortcut; creates its modules in the calling block.

  Args:
    kind: ``'binary'`` (binary 1x1 conv + BN, CMIM/RBNN), ``'real'`` (FP 1x1
      conv + BN, IR-Net/SD-BNN) or ``'option_a'`` (stride-s subsampling and
      zero-padded channels, no weights).
  """
  if strides == 1 and x.shape[-1] == features:
    return x
  if kind == "binary":
    y = conv(features, (1, 1), strides=strides, padding=0, name="downsample")(x, schedule)
  elif kind == "real":
    y = nn.Conv(features, (1, 1), strides=strides, padding=0, use_bias=False,
                dtype=dtype, kernel_init=common.fp_conv_init(), name="downsample")(x)
  elif kind == "option_a":
    extra = features - x.shape[-1]
    if extra < 0:
      raise ValueError(f"option-A shortcut cannot shrink {x.shape[-1]} -> {features} channels")
    y = x[:, ::strides, ::strides, :]
    # Split the zero channels evenly on both sides, as in He et al.'s option A.
    return jnp.pad(y, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  else:
    raise ValueError(f"unknown shortcut {kind!r}; known: {', '.join(SHORTCUTS)}")
  return norm(name="downsample_bn")(y)


class BasicBlock(nn.Module):
  """ResNet-18 block: ``h = hardtanh(BN(bconv(x)))``,
  ``out = hardtanh(BN(bconv(h)) + shortcut(x))``."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  shortcut: str = "binary"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, schedule: Mapping[str, Any]) -> Array:
    h = self.conv(self.features, (3, 3), strides=self.strides, padding=1,
                  name="conv1")(x, schedule)
    h = common.hardtanh(self.norm(name="bn1")(h))
    y = self.norm(name="bn2")(self.conv(self.features, (3, 3), padding=1,
                                        name="conv2")(h, schedule))
    sc = _shortcut(x, self.features, self.strides, self.shortcut, self.conv,
                   self.norm, self.dtype, schedule)
    return common.hardtanh(y + sc)


class BiRealBlock(nn.Module):
  """ResNet-20 block, a real shortcut around each binary conv:
  ``h = hardtanh(BN(bconv(x)) + shortcut(x))``, ``out = hardtanh(BN(bconv(h)) + h)``."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  shortcut: str = "option_a"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, schedule: Mapping[str, Any]) -> Array:
    y = self.conv(self.features, (3, 3), strides=self.strides, padding=1,
                  name="conv1")(x, schedule)
    sc = _shortcut(x, self.features, self.strides, self.shortcut, self.conv,
                   self.norm, self.dtype, schedule)
    h = common.hardtanh(self.norm(name="bn1")(y) + sc)
    y = self.conv(self.features, (3, 3), padding=1, name="conv2")(h, schedule)
    return common.hardtanh(self.norm(name="bn2")(y) + h)


class ResNet(nn.Module):
  """CIFAR ResNet with binary blocks and a full-precision stem and head.

  Attributes:
    stage_sizes: blocks per stage.
    widths: channels per stage; the stem has ``widths[0]``.
    block_cls: :class:`BasicBlock` or :class:`BiRealBlock`.
    num_classes: classifier outputs.
    input_quantizer: activation quantizer of every binary conv.
    kernel_quantizer: weight quantizer of every binary conv.
    input_shift: optional module factory applied before each binary conv's
      sign (e.g. ``functools.partial(layers.ASD, reduction=16)`` for SD-BNN).
    shortcut: downsampling shortcut, one of ``SHORTCUTS``.
    stem_act: hardtanh after the stem BN (IR-Net ResNet-20).
    head_bn: BatchNorm between the pooled features and the classifier.
    bn_axis_name: axis for cross-device BatchNorm statistics.
    dtype: computation dtype (parameters stay float32; logits are float32).
  """
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  block_cls: ModuleDef
  num_classes: int = 10
  input_quantizer: binarize.QuantizerLike = "ede_sign"
  kernel_quantizer: binarize.QuantizerLike = "irnet_weight"
  input_shift: Optional[Callable[..., nn.Module]] = None
  shortcut: str = "binary"
  stem_act: bool = False
  head_bn: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool,
               schedule: Optional[Mapping[str, Any]] = None) -> Array:
    """Logits ``f32[B, num_classes]`` of NHWC images ``x``.

    ``schedule=None`` means k = t = 1 (see ``common.resolve_schedule``).
    """
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f"stage_sizes {self.stage_sizes} and widths {self.widths} "
                       "must have the same length")
    schedule = common.resolve_schedule(schedule)
    norm = common.batch_norm(train, self.bn_axis_name, self.dtype)
    conv = functools.partial(layers.BinaryConv, input_quantizer=self.input_quantizer,
                             kernel_quantizer=self.kernel_quantizer,
                             input_shift=self.input_shift, dtype=self.dtype)
    x = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                kernel_init=common.fp_conv_init(), name="stem_conv")(
                    jnp.asarray(x, self.dtype))
    x = norm(name="stem_bn")(x)
    if self.stem_act:
      x = common.hardtanh(x)
    for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
      for b in range(1, blocks + 1):
        strides = 2 if (s > 1 and b == 1) else 1
        x = self.block_cls(width, strides, conv=conv, norm=norm,
                           shortcut=self.shortcut, dtype=self.dtype,
                           name=f"stage{s}_block{b}")(x, schedule)
    x = jnp.mean(x, axis=(1, 2))
    if self.head_bn:
      x = norm(name="head_bn")(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return jnp.asarray(x, jnp.float32)


_FP = dict(input_quantizer="identity", kernel_quantizer="identity")
_SDBNN = dict(kernel_quantizer="wsd_weight",
              input_shift=functools.partial(layers.ASD, reduction=16))

ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2),
                             widths=(64, 128, 256, 512), block_cls=BasicBlock,
                             shortcut="binary")
ResNet20 = functools.partial(ResNet, stage_sizes=(3, 3, 3), widths=(16, 32, 64),
                             block_cls=BiRealBlock, shortcut="option_a",
                             stem_act=True)

# CMIM: binary downsample; IR-Net / SD-BNN: FP downsample ("realds").
resnet18 = ResNet18
resnet18_fp = functools.partial(ResNet18, **_FP)
resnet18_realds = functools.partial(ResNet18, shortcut="real")
resnet18_realds_fp = functools.partial(ResNet18, shortcut="real", **_FP)
resnet18_sdbnn = functools.partial(ResNet18, shortcut="real", **_SDBNN)
resnet20 = ResNet20
resnet20_fp = functools.partial(ResNet20, **_FP)
resnet20_sdbnn = functools.partial(ResNet20, **_SDBNN)
