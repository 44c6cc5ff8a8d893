"""ResNets with binary convolutions: CIFAR (32x32) and ImageNet (224x224).

* ResNet-18 (CMIM / IR-Net / SD-BNN layout, CIFAR): FP 3x3 stem (stride 1) +
  BN, widths 64-128-256-512, two :class:`BasicBlock` per stage; head GAP ->
  BatchNorm -> FP dense.
* ResNet-20 (IR-Net, Bi-Real style, CIFAR): FP stem + BN + hardtanh, widths
  16-32-64, three :class:`BiRealBlock` per stage, a real-valued shortcut
  around every binary conv, option-A (subsample + zero-pad) downsampling.
* Clipped Bi-Real ResNet-18 (ImageNet, ``birealnet18_clipped``): the
  Bi-Real layout (see ``cmim_jax.models.birealnet``, which has the networks
  as published: ``birealnet18``, ``reactnet18``) built from
  :class:`BiRealBlock`, which applies hardtanh after each residual add as the
  IR-Net ResNet-20 does. Neither Bi-Real nor ReActNet clips there: the clip
  keeps the sign the next binary conv sees, but the clipped sum is what later
  shortcuts carry, and no gradient passes where it clips.

The stem and the classifier stay full precision. Binary and full-precision
twins share this code: the FP twin uses the ``'identity'`` quantizers.

Module names (the CMIM taps refer to them): ``stem_conv``, ``stem_bn``,
``stage{s}_block{b}`` (1-based) holding ``conv1``, ``bn1``, ``conv2``,
``bn2`` and, where the shortcut has weights, ``downsample`` and
``downsample_bn``; then ``head_bn`` (if any) and ``fc``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmim_jax import layers, quantizers
from cmim_jax.models import common, registry

Array = jax.Array
ModuleDef = Any
SHORTCUTS = ("binary", "real", "option_a", "avgpool_real")
STEMS = ("cifar", "imagenet")


def _shortcut(x: Array, features: int, strides: int, kind: str, conv: ModuleDef,
              norm: ModuleDef, dtype: Any, schedule: Mapping[str, Any]) -> Array:
  """The block's shortcut; creates its modules in the calling block.

  Args:
    kind: ``'binary'`` (binary 1x1 conv + BN, CMIM/RBNN), ``'real'`` (FP 1x1
      conv + BN, IR-Net/SD-BNN) or ``'option_a'`` (stride-s subsampling and
      zero-padded channels, no weights) or ``'avgpool_real'`` (Bi-Real:
      2x2 stride-2 average pool when ``strides > 1``, then FP 1x1 conv + BN).
  """
  if strides == 1 and x.shape[-1] == features:
    return x
  if kind == "binary":
    y = conv(features, (1, 1), strides=strides, padding=0, name="downsample")(x, schedule)
  elif kind == "real":
    y = nn.Conv(features, (1, 1), strides=strides, padding=0, use_bias=False,
                dtype=dtype, kernel_init=layers.default_kernel_init, name="downsample")(x)
  elif kind == "avgpool_real":
    if strides != 1:
      x = nn.avg_pool(x, (strides, strides), strides=(strides, strides))
    y = nn.Conv(features, (1, 1), padding=0, use_bias=False, dtype=dtype,
                kernel_init=layers.default_kernel_init, name="downsample")(x)
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


@registry.register_part("BasicBlock")
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


@registry.register_part("BiRealBlock")
class BiRealBlock(nn.Module):
  """ResNet-20 / Bi-Real ResNet-18 block, a real shortcut around each binary conv:
  ``h = hardtanh(BN(bconv(x)) + shortcut(x))``, ``out = hardtanh(BN(bconv(h)) + h)``.

  Bi-Real Net itself has no hardtanh after the adds (``birealnet.BiRealNetBlock``).
  """
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
    # Stored once, not recomputed by each consumer (see common.materialized).
    h = common.materialize_on_cpu(common.hardtanh(self.norm(name="bn1")(y) + sc))
    y = self.conv(self.features, (3, 3), padding=1, name="conv2")(h, schedule)
    return common.materialize_on_cpu(common.hardtanh(self.norm(name="bn2")(y) + h))


class ResNet(nn.Module):
  """ResNet with binary blocks and a full-precision stem and head.

  Attributes:
    stage_sizes: blocks per stage.
    widths: channels per stage; the stem has ``widths[0]``.
    block_cls: :class:`BasicBlock` or :class:`BiRealBlock`.
    num_classes: classifier outputs.
    input_quantizer: activation quantizer of every binary conv.
    kernel_quantizer: weight quantizer of every binary conv.
    input_shift: optional module factory applied before each binary conv's
      sign (e.g. ``functools.partial(layers.ASD, reduction=16)`` for SD-BNN);
      it must take a ``dtype`` field (it gets the model's).
    shortcut: downsampling shortcut, one of ``SHORTCUTS``.
    stem: ``'cifar'`` (FP 3x3 stride-1 conv + BN) or ``'imagenet'`` (FP 7x7
      stride-2 conv + BN + 3x3 stride-2 max-pool with padding 1).
    stem_act: hardtanh after the stem BN (IR-Net ResNet-20).
    head_bn: BatchNorm between the pooled features and the classifier.
    bn_axis_name: axis for cross-device BatchNorm statistics.
    dtype: computation dtype (parameters stay float32; logits are float32).
  """
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  block_cls: ModuleDef
  num_classes: int = 10
  input_quantizer: quantizers.QuantizerLike = "ede_sign"
  kernel_quantizer: quantizers.QuantizerLike = "irnet_weight"
  input_shift: Optional[Callable[..., nn.Module]] = None
  shortcut: str = "binary"
  stem: str = "cifar"
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
    # The shift computes in the model's dtype, or its output would not match
    # the conv's kernel dtype (bfloat16, float64).
    shift = (None if self.input_shift is None
             else functools.partial(self.input_shift, dtype=self.dtype))
    conv = functools.partial(layers.BinaryConv, input_quantizer=self.input_quantizer,
                             kernel_quantizer=self.kernel_quantizer,
                             input_shift=shift, dtype=self.dtype)
    if self.stem not in STEMS:
      raise ValueError(f"unknown stem {self.stem!r}; known: {', '.join(STEMS)}")
    big = self.stem == "imagenet"
    x = nn.Conv(self.widths[0], (7, 7) if big else (3, 3), strides=2 if big else 1,
                padding=3 if big else 1, use_bias=False, dtype=self.dtype,
                kernel_init=layers.default_kernel_init, name="stem_conv")(
                    jnp.asarray(x, self.dtype))
    x = norm(name="stem_bn")(x)
    if self.stem_act:
      x = common.hardtanh(x)
    if big:  # PyTorch MaxPool2d(3, 2, padding=1): the padding never wins.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
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
_BIREAL = dict(input_quantizer="approx_sign", kernel_quantizer="xnor_weight")
_SDBNN = dict(kernel_quantizer="wsd_weight",
              input_shift=functools.partial(layers.ASD, reduction=16))

ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2),
                             widths=(64, 128, 256, 512), block_cls=BasicBlock,
                             shortcut="binary")
ResNet20 = functools.partial(ResNet, stage_sizes=(3, 3, 3), widths=(16, 32, 64),
                             block_cls=BiRealBlock, shortcut="option_a",
                             stem_act=True)
BiRealNet18Clipped = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2),
                                       widths=(64, 128, 256, 512), block_cls=BiRealBlock,
                                       shortcut="avgpool_real", stem="imagenet",
                                       head_bn=False, num_classes=1000, **_BIREAL)

# CMIM: binary downsample; IR-Net / SD-BNN: FP downsample ("realds").
resnet18 = registry.register("resnet18")(ResNet18)
resnet18_fp = registry.register("resnet18_fp")(functools.partial(ResNet18, **_FP))
resnet18_realds = registry.register("resnet18_realds")(
    functools.partial(ResNet18, shortcut="real"))
resnet18_realds_fp = registry.register("resnet18_realds_fp")(
    functools.partial(ResNet18, shortcut="real", **_FP))
resnet18_sdbnn = registry.register("resnet18_sdbnn")(
    functools.partial(ResNet18, shortcut="real", stem_act=True, **_SDBNN))
resnet20 = registry.register("resnet20")(ResNet20)
resnet20_fp = registry.register("resnet20_fp")(functools.partial(ResNet20, **_FP))
resnet20_sdbnn = registry.register("resnet20_sdbnn")(functools.partial(ResNet20, **_SDBNN))
# ImageNet Bi-Real ResNet-18 with IR-Net's clipping (not Bi-Real's network).
birealnet18_clipped = registry.register("birealnet18_clipped")(BiRealNet18Clipped)
