"""Full-precision ImageNet ResNets in torchvision's layout (teachers, MoCo).

``tv_resnet18``, ``tv_resnet34`` (:class:`TVBasicBlock`) and ``tv_resnet50``
(:class:`TVBottleneck`) are torchvision's ``resnet18/34/50`` (He et al. 2016,
"ResNet v1.5": the bottleneck's stride sits on its 3x3 conv): 7x7 stride-2
stem conv + BN + ReLU + 3x3 stride-2 max-pool, four stages, ReLU after every
BN except the last of a block, which is added to the shortcut before the ReLU;
the shortcut is the identity, or a 1x1 conv (with the block's stride) + BN
where the shape changes; then global average pooling and a linear classifier
``fc`` (its input is the penultimate feature ``train._apply`` taps).

The convs inside the blocks are :class:`cmim_jax.layers.BinaryConv` with the
``'identity'`` quantizers by default, so the networks are full precision and
sow nothing, and the model has the ``input_quantizer``/``kernel_quantizer``
fields every registered model has. Other quantizers would binarize those
convs; no reference checks that use.

Module names follow the other ResNets here (``stem_conv``, ``stem_bn``,
``stage{s}_block{b}`` 1-based with ``conv{j}``, ``bn{j}``, ``downsample``,
``downsample_bn``, then ``fc``); :func:`from_torchvision_state_dict` reads
torchvision's names (``conv1``, ``bn1``, ``layer{s}.{b}.*``, ``fc``).

References:
  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016;
  torchvision ``models/resnet.py``.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmim_jax import layers, quantizers
from cmim_jax.models import common, registry, torch_convert

Array = jax.Array
ModuleDef = Any

# torchvision initialises convs with kaiming_normal_(mode='fan_out', 'relu').
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _downsample(x: Array, features: int, strides: int, norm: ModuleDef, dtype: Any) -> Array:
  """torchvision's shortcut: identity, or 1x1 conv (stride ``strides``) + BN."""
  if strides == 1 and x.shape[-1] == features:
    return x
  y = nn.Conv(features, (1, 1), strides=strides, padding=0, use_bias=False, dtype=dtype,
              kernel_init=conv_init, name="downsample")(x)
  return norm(name="downsample_bn")(y)


@registry.register_part("TVBasicBlock")
class TVBasicBlock(nn.Module):
  """``relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + shortcut(x))``; ``features`` out."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, schedule: Mapping[str, Any]) -> Array:
    h = self.conv(self.features, (3, 3), strides=self.strides, padding=1,
                  name="conv1")(x, schedule)
    h = nn.relu(self.norm(name="bn1")(h))
    y = self.norm(name="bn2")(self.conv(self.features, (3, 3), padding=1,
                                        name="conv2")(h, schedule))
    return nn.relu(y + _downsample(x, self.features, self.strides, self.norm, self.dtype))


@registry.register_part("TVBottleneck")
class TVBottleneck(nn.Module):
  """1x1 (``features``) -> 3x3 stride s -> 1x1 (``4 * features``), BN + ReLU
  between, ``relu(BN(.) + shortcut(x))``; ``4 * features`` out."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  dtype: Any = jnp.float32
  expansion: int = 4

  @nn.compact
  def __call__(self, x: Array, schedule: Mapping[str, Any]) -> Array:
    h = nn.relu(self.norm(name="bn1")(self.conv(self.features, (1, 1), padding=0,
                                                name="conv1")(x, schedule)))
    h = nn.relu(self.norm(name="bn2")(self.conv(self.features, (3, 3), strides=self.strides,
                                                padding=1, name="conv2")(h, schedule)))
    out = self.features * self.expansion
    y = self.norm(name="bn3")(self.conv(out, (1, 1), padding=0, name="conv3")(h, schedule))
    return nn.relu(y + _downsample(x, out, self.strides, self.norm, self.dtype))


class TVResNet(nn.Module):
  """torchvision's ImageNet ResNet.

  Attributes:
    stage_sizes: blocks per stage ((2, 2, 2, 2) ResNet-18, (3, 4, 6, 3) 34/50).
    block_cls: :class:`TVBasicBlock` or :class:`TVBottleneck`.
    widths: the blocks' ``features`` per stage (a bottleneck outputs 4x).
    num_classes: classifier outputs.
    input_quantizer: activation quantizer of the block convs (``'identity'``).
    kernel_quantizer: weight quantizer of the block convs (``'identity'``).
    bn_axis_name: axis for cross-device BatchNorm statistics.
    dtype: computation dtype (parameters stay float32; logits are float32).
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: ModuleDef = TVBasicBlock
  widths: Sequence[int] = (64, 128, 256, 512)
  num_classes: int = 1000
  input_quantizer: quantizers.QuantizerLike = "identity"
  kernel_quantizer: quantizers.QuantizerLike = "identity"
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool,
               schedule: Optional[Mapping[str, Any]] = None) -> Array:
    """Logits ``f32[B, num_classes]`` of normalised NHWC images ``x``."""
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f"stage_sizes {self.stage_sizes} and widths {self.widths} "
                       "must have the same length")
    schedule = common.resolve_schedule(schedule)
    norm = common.batch_norm(train, self.bn_axis_name, self.dtype)
    conv = functools.partial(layers.BinaryConv, input_quantizer=self.input_quantizer,
                             kernel_quantizer=self.kernel_quantizer, kernel_init=conv_init,
                             dtype=self.dtype)
    x = nn.Conv(self.widths[0], (7, 7), strides=2, padding=3, use_bias=False,
                dtype=self.dtype, kernel_init=conv_init, name="stem_conv")(
                    jnp.asarray(x, self.dtype))
    x = nn.relu(norm(name="stem_bn")(x))
    # PyTorch MaxPool2d(3, 2, padding=1): after the ReLU the padding never wins.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
      for b in range(1, blocks + 1):
        x = self.block_cls(width, 2 if (s > 1 and b == 1) else 1, conv=conv, norm=norm,
                           dtype=self.dtype, name=f"stage{s}_block{b}")(x, schedule)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return jnp.asarray(x, jnp.float32)


TVResNet18 = functools.partial(TVResNet, stage_sizes=(2, 2, 2, 2), block_cls=TVBasicBlock)
TVResNet34 = functools.partial(TVResNet, stage_sizes=(3, 4, 6, 3), block_cls=TVBasicBlock)
TVResNet50 = functools.partial(TVResNet, stage_sizes=(3, 4, 6, 3), block_cls=TVBottleneck)

tv_resnet18 = registry.register("tv_resnet18")(TVResNet18)
tv_resnet34 = registry.register("tv_resnet34")(TVResNet34)
tv_resnet50 = registry.register("tv_resnet50")(TVResNet50)


def _target(name: str) -> Optional[tuple[str, str]]:
  """torchvision parameter name -> (module path, leaf), or None."""
  m = re.fullmatch(r"layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)", name)
  if m:
    prefix = f"stage{int(m.group(1))}_block{int(m.group(2)) + 1}/"
    module = {"downsample.0": "downsample", "downsample.1": "downsample_bn"}.get(
        m.group(3), m.group(3))
    leaf = m.group(4)
  else:
    m = re.fullmatch(r"(conv1|bn1|fc)\.(\w+)", name)
    if m is None:
      return None
    prefix, leaf = "", m.group(2)
    module = {"conv1": "stem_conv", "bn1": "stem_bn", "fc": "fc"}[m.group(1)]
  if module == "fc":
    return ("fc", {"weight": "kernel", "bias": "bias"}[leaf]) if leaf in (
        "weight", "bias") else None
  if module.endswith("bn") or re.fullmatch(r"bn\d", module):
    leaf = torch_convert.BN_LEAVES.get(leaf)
    return None if leaf is None else (prefix + module, leaf)
  return (prefix + module, "kernel") if leaf == "weight" else None


def _place(name: str, value: np.ndarray):
  target = _target(name)
  if target is None:
    return None
  path, leaf = target
  if leaf == "kernel":
    value = torch_convert.transform(value, "transpose" if value.ndim == 2 else "oihw")
  return path, leaf, value


def from_torchvision_state_dict(state_dict: Mapping[str, Any]) -> dict[str, dict]:
  """Flax variables of ``tv_resnet*`` from a torchvision ResNet ``state_dict``.

  Block ``b`` (0-based) of ``layer{s}`` becomes ``stage{s}_block{b + 1}``;
  conv kernels go from OIHW to HWIO and ``fc.weight`` is transposed. A
  leading ``'module.'`` (``nn.DataParallel``) is dropped;
  ``num_batches_tracked`` is ignored. The map is linear (transposes only), so
  it also converts gradients.

  Args:
    state_dict: name -> array (numpy, or anything ``np.asarray`` takes, e.g.
      CPU torch tensors).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` nested dicts of numpy arrays
    (``batch_stats`` only if running statistics were given).

  Raises:
    ValueError: keys that are not torchvision ResNet parameters (all listed;
      e.g. a MoCo checkpoint's ``encoder_q.`` prefix must be removed first and
      its projection head dropped).
  """
  return torch_convert.to_variables(
      state_dict, _place, "a torchvision ResNet (conv1, bn1, layer{s}.{b}.*, fc)")
