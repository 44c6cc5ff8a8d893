"""ImageNet ResNet-18s of Bi-Real Net and ReActNet, as their authors define them.

Both networks are a stack of 16 binary *units*; a unit is one binary 3x3 conv
with its own real-valued shortcut (Liu et al. 2018, fig. 1):

* Bi-Real unit: ``out = BN(bconv(sign(x))) + shortcut(x)``. Nothing follows
  the add: the real-valued sum is the next unit's input and shortcut.
* ReActNet unit (the Bi-Real-based ReActNet of Liu et al. 2020):
  ``out = RPReLU(BN(bconv(sign(x + beta))) + shortcut(x))``: RSign's learned
  per-channel shift ``beta`` before the sign (the shortcut sees the unshifted
  ``x``), RPReLU after the add.

``sign`` has the ApproxSign gradient; kernels are ``alpha_c sign(W)`` with the
per-output-channel mean ``|W|`` as a detached scale and the clipped STE
(``'xnor_weight'``), as in both released PyTorch codes. (The Bi-Real paper's
magnitude-aware gradient also multiplies the STE by ``alpha_c``; its code,
which ReActNet reuses, does not.) ``shortcut`` is the identity,
except in the first unit of stages 2-4: 2x2 stride-2 average pool + FP 1x1
conv + BN. Stem: FP 7x7 stride-2 conv + BN + 3x3 stride-2 max-pool (no
activation); head: global average pool + FP linear layer (no BN).

Two units make one ResNet block here (``stage{s}_block{b}`` holding ``conv1``
(+ ``bn1``, ``act1``, ``downsample``) and ``conv2`` (+ ``bn2``, ``act2``)),
so the module paths and CMIM taps are those of every other ResNet-18 in
``cmim_jax.models``. The official PyTorch code lists units instead
(``layer{s}.{u}``, four per stage); :func:`from_official_state_dict` maps one
naming to the other.

ReActNet trains in two steps: step 1 with binary activations and real
weights (``kernel_quantizer='identity'``, same parameters), step 2 from its
weights with both binary. The ``*_fp`` twins use ``'identity'`` for both.

References:
  Liu et al., "Bi-Real Net: Enhancing the Performance of 1-bit CNNs with
  Improved Representational Capability and Advanced Training Algorithm",
  ECCV 2018. Liu et al., "ReActNet: Towards Precise Binary Neural Network
  with Generalized Activation Functions", ECCV 2020.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmim_jax import layers
from cmim_jax.models import registry, resnet, torch_convert

Array = jax.Array
ModuleDef = Any


@registry.register_part("BiRealNetBlock")
class BiRealNetBlock(nn.Module):
  """Two Bi-Real units: ``h = act1(BN(bconv(x)) + shortcut(x))``,
  ``out = act2(BN(bconv(h)) + h)``; ``act`` is the identity unless
  ``post_add`` is given (ReActNet: :class:`cmim_jax.layers.RPReLU`).

  Attributes:
    features: output channels.
    strides: stride of the first conv (and of the shortcut's pool).
    conv: binary conv factory (carries the quantizers and any input shift).
    norm: BatchNorm factory.
    shortcut: kind of the first unit's shortcut when the shape changes
      (``'avgpool_real'`` in both papers; see ``resnet.SHORTCUTS``).
    post_add: optional module factory applied after each residual add.
    dtype: computation dtype.
  """
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  shortcut: str = "avgpool_real"
  post_add: Optional[Callable[..., nn.Module]] = None
  dtype: Any = jnp.float32

  def _act(self, x: Array, name: str) -> Array:
    return x if self.post_add is None else self.post_add(dtype=self.dtype, name=name)(x)

  @nn.compact
  def __call__(self, x: Array, schedule: Mapping[str, Any]) -> Array:
    y = self.conv(self.features, (3, 3), strides=self.strides, padding=1,
                  name="conv1")(x, schedule)
    # The ResNet shortcut kinds, shared rather than repeated.
    sc = resnet._shortcut(  # pylint: disable=protected-access
        x, self.features, self.strides, self.shortcut, self.conv, self.norm, self.dtype,
        schedule)
    h = self._act(self.norm(name="bn1")(y) + sc, "act1")
    y = self.conv(self.features, (3, 3), padding=1, name="conv2")(h, schedule)
    return self._act(self.norm(name="bn2")(y) + h, "act2")


_FP = dict(input_quantizer="identity", kernel_quantizer="identity")
_RSIGN_SHIFT = functools.partial(layers.RSign, shift_only=True)

BiRealNet18 = functools.partial(
    resnet.ResNet, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512),
    block_cls=BiRealNetBlock, shortcut="avgpool_real", stem="imagenet",
    head_bn=False, num_classes=1000, input_quantizer="approx_sign",
    kernel_quantizer="xnor_weight")
# The shift rides in each binary conv (its ``input_shift``) so that the conv
# sows the shifted input it binarizes as ``a_F``, as CMIM needs.
ReActNet18 = functools.partial(
    BiRealNet18, input_shift=_RSIGN_SHIFT,
    block_cls=functools.partial(BiRealNetBlock, post_add=layers.RPReLU))

birealnet18 = registry.register("birealnet18")(BiRealNet18)
birealnet18_fp = registry.register("birealnet18_fp")(functools.partial(BiRealNet18, **_FP))
reactnet18 = registry.register("reactnet18")(ReActNet18)
reactnet18_fp = registry.register("reactnet18_fp")(functools.partial(ReActNet18, **_FP))


_bn = torch_convert.batch_norm

# Official unit parameter -> (module inside conv{j}'s block, leaf, transform).
_UNIT_KEYS: dict[str, tuple[str, str, str]] = {
    "binary_conv.weight": ("conv{j}", "kernel", "oihw"),
    **_bn("bn1", "bn{j}"),
    "downsample.1.weight": ("downsample", "kernel", "oihw"),
    **_bn("downsample.2", "downsample_bn"),
    "move0.bias": ("conv{j}/input_shift", "beta", "channel"),
    # LearnableBias adds move1 before the PReLU; RPReLU subtracts gamma.
    "move1.bias": ("act{j}", "gamma", "neg_channel"),
    "prelu.weight": ("act{j}", "slope", ""),
    "move2.bias": ("act{j}", "zeta", "channel"),
}
_TOP_KEYS: dict[str, tuple[str, str, str]] = {
    "conv1.weight": ("stem_conv", "kernel", "oihw"),
    **_bn("bn1", "stem_bn"),
    "fc.weight": ("fc", "kernel", "transpose"),
    "fc.bias": ("fc", "bias", ""),
}


def unit_spec(name: str, unit_keys: Mapping[str, tuple[str, str, str]],
              top_keys: Mapping[str, tuple[str, str, str]]):
  """``(spec, module prefix, j)`` of an official Bi-Real ResNet name, or
  ``(None, '', 0)``: unit ``u`` (0-based) of ``layer{s}`` is ``conv{j}``,
  ``j = u % 2 + 1``, of ``stage{s}_block{u // 2 + 1}``, its entry in
  ``unit_keys``; other names are looked up in ``top_keys``."""
  m = re.fullmatch(r"layer(\d+)\.(\d+)\.(.+)", name)
  if m:
    unit = int(m.group(2))
    return (unit_keys.get(m.group(3)), f"stage{int(m.group(1))}_block{unit // 2 + 1}/",
            unit % 2 + 1)
  return top_keys.get(name), "", 0


def _place(name: str, value: np.ndarray):
  spec, prefix, j = unit_spec(name, _UNIT_KEYS, _TOP_KEYS)
  if spec is None:
    return None
  module, leaf, how = spec
  return prefix + module.format(j=j), leaf, torch_convert.transform(value, how)


def from_official_state_dict(state_dict: Mapping[str, Any]) -> dict[str, dict]:
  """Flax variables of ``birealnet18``/``reactnet18`` from the official weights.

  Accepts the ``state_dict`` of the Bi-Real Net and ReActNet PyTorch models
  (``BiRealNet(BasicBlock, [4, 4, 4, 4])``, units ``layer{s}.{u}``), with or
  without the ``'module.'`` prefix ``nn.DataParallel`` checkpoints carry.
  Unit ``u`` (0-based) of stage ``s`` becomes ``conv{u % 2 + 1}`` of
  ``stage{s}_block{u // 2 + 1}``. The conversion is linear (transposes and
  one sign flip, ``gamma = -move1.bias``), so it also maps gradients.

  Args:
    state_dict: parameter name -> array (numpy, or anything ``np.asarray``
      takes, e.g. CPU torch tensors).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` nested dicts of numpy arrays
    (``batch_stats`` only if running statistics were given).

  Raises:
    ValueError: a key that is neither a Bi-Real nor a ReActNet parameter
      (all such keys are listed).
  """
  return torch_convert.to_variables(
      state_dict, _place, "the official Bi-Real/ReActNet ResNet "
      "(BiRealNet(BasicBlock, [4, 4, 4, 4]))")
