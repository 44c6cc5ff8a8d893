"""ReActNet-A: the MobileNet-V1 layout with binary convolutions (Liu et al. 2020).

MobileNet-V1's thirteen depthwise-separable blocks, with each depthwise 3x3
replaced by a full binary 3x3 conv and each pointwise 1x1 by a binary 1x1,
a real-valued shortcut around every binary conv, RSign before and RPReLU
after each of them. Block ``i`` (``c`` input channels, ``c'`` output
channels, stride ``s``) computes, as the official ``mobilenet/`` code does::

    h   = RPReLU_1(BN_1(bconv3x3_s(sign(x + beta_1))) + pool_s(x))   # c channels
    b   = sign(h + beta_2)
    out = RPReLU_2(BN_2(bconv1x1(b)) + h)                    if c' == c
    out = RPReLU_2(concat(BN_21(bconv1x1_1(b)) + h,
                          BN_22(bconv1x1_2(b)) + h))         if c' == 2c

``pool_s`` is the identity for ``s = 1`` and a 2x2 stride-2 average pool for
``s = 2``: the shortcuts have no weights. A channel-doubling block is two
``c -> c`` binary 1x1 convs sharing one binarized input, each with its own
BatchNorm and the same shortcut ``h``, concatenated. Stem: FP 3x3 stride-2
conv (32 channels) + BN, no activation; head: global average pool + FP linear
layer on the 1024-d features (the input of ``fc``, what ``train._apply``
hands to feature terms).

``sign`` has the ApproxSign gradient (``'approx_sign'``); kernels are
``alpha_c sign(W)`` with the detached per-output-channel mean ``|W|`` and
the clipped STE (``'xnor_weight'``), as in the released code. RSign's shift
(``beta``) is its own module (``shift1``, ``shift2``: one shift shared by
both convs of a doubling block, as in the official code), so each binary conv
sows the shifted input it binarizes as ``a_F`` (the CMIM taps).

Variants (``widths`` and ``strides`` list the stem first, then the blocks):

* ``reactnet_a`` (224x224): the paper's network. Widths 32, 64, 128, 128,
  256, 256, 512 x 6, 1024, 1024; stride 2 in the stem and in the blocks into
  128, 256, 512 and 1024 channels (feature maps 112, 112, 56, 28, 14, 7).
* ``reactnet_a_cifar`` (32x32): the same blocks with the stem at stride 1 and
  the block into 128 channels at stride 1 too, so three downsamplings remain
  (feature maps 32, 32, 32, 16, 8, 4: the 4x4 final map of the CIFAR
  ResNet-18s here).
* ``*_fp``: ``'identity'`` quantizers (same parameters). ReActNet's step 1
  (binary activations, real weights) is ``kernel_quantizer='identity'``.

Module names: ``stem_conv``, ``stem_bn``, ``block{i}`` (1-based) holding
``shift1``, ``conv1``, ``bn1``, ``act1``, ``shift2``, then ``conv2`` and
``bn2`` or ``conv2_1``, ``conv2_2``, ``bn2_1``, ``bn2_2``, and ``act2``;
``fc``. (Numbered, not ``conv3x3``/``conv1x1``, so that the numeric order
CMIM's ``'last:N'`` taps sort by is the call order.)
:func:`from_official_state_dict` maps the official names
(``feature.{i}.move11.bias``, ...) onto these.

References:
  Liu et al., "ReActNet: Towards Precise Binary Neural Network with
  Generalized Activation Functions", ECCV 2020 (section 3.1, fig. 2).
  Howard et al., "MobileNets", 2017 (the layout).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmim_jax import binarize, layers
from cmim_jax.models import common, registry, torch_convert

Array = jax.Array
ModuleDef = Any

# MobileNet-V1's channels: the stem, then the 13 blocks.
WIDTHS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
# The official rule: stride 2 where the width changes, except into 64 channels.
STRIDES = (2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
CIFAR_STRIDES = (1, 1, 1, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)


class ReActBlock(nn.Module):
  """One ReActNet-A block (see the module docstring).

  Attributes:
    features: output channels, the input's or twice as many.
    strides: stride of the 3x3 conv and of its shortcut's average pool.
    conv: binary conv factory (carries the quantizers).
    norm: BatchNorm factory.
    dtype: computation dtype.
  """
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  dtype: Any = jnp.float32

  def _shift(self, x: Array, name: str) -> Array:
    return layers.RSign(dtype=self.dtype, shift_only=True, name=name)(x)

  @nn.compact
  def __call__(self, x: Array, schedule: Mapping[str, Any]) -> Array:
    c = x.shape[-1]
    if self.features not in (c, 2 * c):
      raise ValueError(f"{self.name}: a ReActNet-A block keeps or doubles its channels; "
                       f"got {c} -> {self.features} (fix the model's widths)")
    if self.strides not in (1, 2):
      raise ValueError(f"{self.name}: stride {self.strides}, expected 1 or 2")
    y = self.conv(c, (3, 3), strides=self.strides, padding=1,
                  name="conv1")(self._shift(x, "shift1"), schedule)
    sc = x
    if self.strides == 2:
      if x.shape[1] % 2 or x.shape[2] % 2:
        # Conv (padding 1) rounds an odd size up, the 2x2 pool down.
        raise ValueError(f"{self.name}: stride 2 on an odd {x.shape[1]}x{x.shape[2]} map; "
                         "use an input size the model's strides divide (224, 64, 32)")
      sc = nn.avg_pool(x, (2, 2), strides=(2, 2))
    h = layers.RPReLU(dtype=self.dtype, name="act1")(self.norm(name="bn1")(y) + sc)
    b = self._shift(h, "shift2")
    if self.features == c:
      y = self.conv(c, (1, 1), padding=0, name="conv2")(b, schedule)
      out = self.norm(name="bn2")(y) + h
    else:
      out = jnp.concatenate([
          self.norm(name=f"bn2_{j}")(
              self.conv(c, (1, 1), padding=0, name=f"conv2_{j}")(b, schedule)) + h
          for j in (1, 2)], axis=-1)
    return layers.RPReLU(dtype=self.dtype, name="act2")(out)


class ReActNetA(nn.Module):
  """ReActNet-A with a full-precision stem and classifier.

  Attributes:
    num_classes: classifier outputs.
    widths: channels of the stem, then of each block (14 entries for the
      paper's network; any length >= 2 whose blocks keep or double).
    strides: stride of the stem, then of each block (1 or 2), as many as
      ``widths``.
    input_quantizer: activation quantizer of every binary conv.
    kernel_quantizer: weight quantizer of every binary conv.
    bn_axis_name: axis for cross-device BatchNorm statistics.
    dtype: computation dtype (parameters stay float32; logits are float32).
  """
  num_classes: int = 1000
  widths: Sequence[int] = WIDTHS
  strides: Sequence[int] = STRIDES
  input_quantizer: binarize.QuantizerLike = "approx_sign"
  kernel_quantizer: binarize.QuantizerLike = "xnor_weight"
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool,
               schedule: Optional[Mapping[str, Any]] = None) -> Array:
    """Logits ``f32[B, num_classes]`` of NHWC images ``x``."""
    if len(self.widths) != len(self.strides) or len(self.widths) < 2:
      raise ValueError(f"widths {tuple(self.widths)} and strides {tuple(self.strides)} must "
                       "have the same length (the stem, then one entry per block)")
    schedule = common.resolve_schedule(schedule)
    norm = common.batch_norm(train, self.bn_axis_name, self.dtype)
    conv = functools.partial(layers.BinaryConv, input_quantizer=self.input_quantizer,
                             kernel_quantizer=self.kernel_quantizer, dtype=self.dtype)
    x = nn.Conv(self.widths[0], (3, 3), strides=self.strides[0], padding=1, use_bias=False,
                dtype=self.dtype, kernel_init=layers.default_kernel_init,
                name="stem_conv")(jnp.asarray(x, self.dtype))
    x = norm(name="stem_bn")(x)
    for i, (width, stride) in enumerate(zip(self.widths[1:], self.strides[1:]), start=1):
      x = ReActBlock(width, stride, conv=conv, norm=norm, dtype=self.dtype,
                     name=f"block{i}")(x, schedule)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return jnp.asarray(x, jnp.float32)


_FP = dict(input_quantizer="identity", kernel_quantizer="identity")
ReActNetACifar = functools.partial(ReActNetA, strides=CIFAR_STRIDES, num_classes=10)

reactnet_a = registry.register("reactnet_a")(ReActNetA)
reactnet_a_fp = registry.register("reactnet_a_fp")(functools.partial(ReActNetA, **_FP))
reactnet_a_cifar = registry.register("reactnet_a_cifar")(ReActNetACifar)
reactnet_a_cifar_fp = registry.register("reactnet_a_cifar_fp")(
    functools.partial(ReActNetACifar, **_FP))


# Official block parameter -> (module in block{i}, leaf, transform); the
# BatchNorms (bn1, bn2, bn2_1, bn2_2) keep their names.
_BLOCK_KEYS: dict[str, tuple[str, str, str]] = {
    "move11.bias": ("shift1", "beta", "channel"),
    "binary_3x3.weight": ("conv1", "kernel", "oihw"),
    # LearnableBias adds move12 before the PReLU; RPReLU subtracts gamma.
    "move12.bias": ("act1", "gamma", "neg_channel"),
    "prelu1.weight": ("act1", "slope", ""),
    "move13.bias": ("act1", "zeta", "channel"),
    "move21.bias": ("shift2", "beta", "channel"),
    "binary_pw.weight": ("conv2", "kernel", "oihw"),
    "binary_pw_down1.weight": ("conv2_1", "kernel", "oihw"),
    "binary_pw_down2.weight": ("conv2_2", "kernel", "oihw"),
    "move22.bias": ("act2", "gamma", "neg_channel"),
    "prelu2.weight": ("act2", "slope", ""),
    "move23.bias": ("act2", "zeta", "channel"),
}
_BN_LEAVES = torch_convert.BN_LEAVES
_BLOCK_CONVS = {"binary_3x3": 3, "binary_pw": 1, "binary_pw_down1": 1, "binary_pw_down2": 1}


def _spec(name: str, value: np.ndarray) -> Optional[tuple[str, str, str, np.ndarray]]:
  """``(module path, leaf, transform, value)`` of one official parameter."""
  m = re.fullmatch(r"feature\.0\.(conv1\.weight|bn1\.(\w+))", name)
  if m:
    if m.group(2) is None:
      return "stem_conv", "kernel", "oihw", value
    leaf = _BN_LEAVES.get(m.group(2))
    return None if leaf is None else ("stem_bn", leaf, "", value)
  if name == "fc.weight":
    return "fc", "kernel", "transpose", value
  if name == "fc.bias":
    return "fc", "bias", "", value
  m = re.fullmatch(r"feature\.(\d+)\.(.+)", name)
  if not m:
    return None
  prefix, rest = f"block{int(m.group(1))}/", m.group(2)
  conv = re.fullmatch(r"(\w+)\.weights", rest)
  if conv and conv.group(1) in _BLOCK_CONVS:
    # Step 2's HardBinaryConv keeps its kernel flat, (out * in * k * k, 1), in
    # the element order of (out, in, k, k); every block conv has out == in.
    k = _BLOCK_CONVS[conv.group(1)]
    c = int(round((value.size / (k * k)) ** 0.5))
    if c * c * k * k != value.size:
      return None
    value = value.reshape(c, c, k, k)
    rest = conv.group(1) + ".weight"
  bn = re.fullmatch(r"(bn1|bn2|bn2_1|bn2_2)\.(\w+)", rest)
  if bn:
    leaf = _BN_LEAVES.get(bn.group(2))
    return None if leaf is None else (prefix + bn.group(1), leaf, "", value)
  spec = _BLOCK_KEYS.get(rest)
  return None if spec is None else (prefix + spec[0], spec[1], spec[2], value)


def from_official_state_dict(state_dict: Mapping[str, Any]) -> dict[str, dict]:
  """Flax variables of ``reactnet_a`` (and its variants) from official weights.

  Accepts the ``state_dict`` of liuzechun/ReActNet's ``mobilenet/`` model
  (``reactnet()``: ``feature.{i}.*`` and ``fc.*``), of step 1 (real 1x1/3x3
  kernels ``*.weight``) or step 2 (``HardBinaryConv``'s flat ``*.weights``),
  with or without the ``'module.'`` prefix of ``nn.DataParallel``. The
  conversion is linear (reshapes, transposes, one sign flip: ``gamma =
  -move12.bias``), so it also maps gradients.

  S2-BNN's copy of the network (szq0214/S2-BNN ``ReActNet.py``) creates
  ``binary_pw`` + ``bn2`` and ``binary_pw_down{1,2}`` + ``bn2_{1,2}`` in
  every block and uses one pair: the unused one is dropped (a block doubles
  when its ``binary_pw`` maps ``c`` to ``2c`` channels). Its MoCo wrapper's
  ``encoder_q.`` prefix and MLP head are not read here: strip the prefix and
  pass ``fc.0.*`` as ``fc.*``.

  Args:
    state_dict: parameter name -> array (numpy or CPU torch tensors), or the
      official training script's checkpoint dict holding it as
      ``'state_dict'``.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` nested dicts of numpy arrays
    (``batch_stats`` only if running statistics were given).

  Raises:
    ValueError: keys that are not parameters of the official ReActNet-A
      (all such keys are listed).
  """
  if isinstance(state_dict.get("state_dict"), Mapping):
    state_dict = state_dict["state_dict"]  # {'epoch', 'state_dict', 'best_top1_acc', ...}

  def place(name: str, value: np.ndarray):
    spec = _spec(name, value)
    if spec is None:
      return None
    module, leaf, how, value = spec
    return module, leaf, torch_convert.transform(value, how)

  variables = torch_convert.to_variables(
      state_dict, place, "the official ReActNet-A (liuzechun/ReActNet mobilenet/reactnet.py)")
  _drop_unused_pointwise(variables)
  return variables


def _drop_unused_pointwise(variables: dict[str, dict]) -> None:
  """Keeps, per block, the 1x1 conv(s) its shape uses (see S2-BNN above)."""
  for block, p in variables["params"].items():
    if "conv2" not in p or not {"conv2_1", "conv2_2"} & set(p):
      continue
    _, _, cin, cout = p["conv2"]["kernel"].shape
    unused = ("conv2", "bn2") if cout != cin else ("conv2_1", "conv2_2", "bn2_1", "bn2_2")
    for col in variables.values():
      for name in unused:
        col.get(block, {}).pop(name, None)
