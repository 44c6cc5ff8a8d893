r"""SD-BNN's ImageNet ResNet-18 (``birealnet18_sdbnn``), as its code defines it.

Xue et al.'s ImageNet network (pingxue-hfut/SD-BNN, ``imagenet/birealnet.py``)
is Bi-Real Net's ResNet-18 (16 binary units, each with its own real-valued
shortcut; :mod:`cmim_jax.models.birealnet`) with three changes per unit:

* ASD before the sign: ``x + sigmoid(W_2 relu(W_1 GAP(x)))``, a bias-free
  squeeze-excitation branch with reduction **8** (16 on CIFAR);
  :class:`cmim_jax.layers.ASD`. The shortcut sees the unshifted ``x``.
* WSD kernels with the clipped STE (:func:`wsd_ste_weight`): no scale
  factor, and the gradient of ``clamp(W', -1, 1)`` instead of CIFAR's EDE.
* A per-channel PReLU (:class:`PReLU`, slope init 0.25) after each residual
  add: ``out = PReLU(BN(bconv(sign(ASD(x)))) + shortcut(x))``.

The sign of the activations has Bi-Real's ApproxSign gradient (no EDE on
ImageNet); stem (7x7 conv + BN + max-pool, no activation), shortcuts (2x2
average pool + FP 1x1 conv + BN) and head (GAP + FC, no BN) are Bi-Real's.

Two stages (the code's docstring): stage 1 binary activations, real weights
(``kernel_quantizer='identity'``; the model then has no WSD ``a``), stage 2
from stage 1's weights with both binary (``a`` new, initialised to 0 as the
code's ``alpha``). What the released code does differently from the paper or
from itself, and how this module resolves it:

* The weight binarization is commented out in the release and the stage-1
  branch leaves ``binary_weights`` undefined (the file does not run as
  released); here stage 1 uses the real weights, stage 2 the commented code.
* Its latent weights start at ``uniform(0, 0.001)`` (all positive); here
  Flax's usual initialisers apply (stage 2 starts from stage 1 anyway).
* The README names Bulat et al.'s training methods (PReLU, reverse-order
  initialisation, i.e. binary activations before binary weights, which the
  two stages are, and knowledge distillation) and the model file a ResNet-34
  teacher; no training script or teacher is released
  (``configs/sdbnn_imagenet.py`` states the choices made).

References:
  Xue et al., "Self-Distribution Binary Neural Networks", 2021 (arXiv:2103.02394).
  Liu et al., "Bi-Real Net", ECCV 2018.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmim_jax import binarize, layers, quantizers
from cmim_jax.models import birealnet, registry, torch_convert

Array = jax.Array


def wsd_ste_weight(w: Array, a: Array) -> Array:
  r"""SD-BNN's ImageNet WSD: a shifted sign with the clipped STE.

  Forward, per output channel c (the last axis):

  .. math::
     W' = W + \sigma(a_c) \cdot 0.01 \cdot \overline{W}_c, \qquad
     W_b = \mathrm{sign}(W'),

  with :math:`\overline{W}_c` the signed mean over the channel's weights.

  Surrogate gradient: :math:`\overline{W}_c` is detached; the sign passes the
  gradient where :math:`|W'| \le 1` (``clamp``'s gradient) to ``W`` and,
  through :math:`\sigma(a_c)`, to ``a``.

  Args:
    w: latent kernel, output channels on the last axis.
    a: shift logits, shape ``(w.shape[-1],)`` (the code's ``alpha``, init 0).

  Returns:
    ``-1``/``+1`` with the shape and dtype of ``w``.
  """
  if a.shape != (w.shape[-1],):
    raise ValueError(f"wsd_ste_weight: a must have shape ({w.shape[-1]},) for kernel "
                     f"{w.shape}, got {a.shape}")
  mean = jax.lax.stop_gradient(jnp.mean(w, axis=tuple(range(w.ndim - 1))))
  return binarize.ste_sign(w + (jax.nn.sigmoid(a) * 0.01 * mean).astype(w.dtype), clip=1.0)


quantizers.register(quantizers.Quantizer(
    "wsd_ste_weight", wsd_ste_weight,
    params=(("a", quantizers.ParamSpec(lambda shape: (shape[-1],),
                                       jax.nn.initializers.zeros)),)))


@registry.register_part("PReLU")
class PReLU(nn.Module):
  """``x`` where ``x >= 0`` else ``slope_c x``; ``slope`` per channel, init
  0.25 (``torch.nn.PReLU(C)``).

  Attributes:
    dtype: computation dtype.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    slope = self.param("slope", nn.initializers.constant(0.25), (x.shape[-1],), jnp.float32)
    x = jnp.asarray(x, self.dtype)
    return jnp.where(x >= 0, x, slope.astype(self.dtype) * x)


BiRealNet18SDBNN = functools.partial(
    birealnet.BiRealNet18, kernel_quantizer="wsd_ste_weight",
    input_shift=functools.partial(layers.ASD, reduction=8),
    block_cls=functools.partial(birealnet.BiRealNetBlock, post_add=PReLU))

birealnet18_sdbnn = registry.register("birealnet18_sdbnn")(BiRealNet18SDBNN)


# Official unit parameter -> (module inside the unit's block, leaf, transform).
_UNIT_KEYS: dict[str, tuple[str, str, str]] = {
    "binary_conv.weights": ("conv{j}", "kernel", "flat_oihw"),
    "binary_conv.alpha": ("conv{j}", "a", ""),
    "binary_conv.beta.fc.0.weight": ("conv{j}/input_shift/fc1", "kernel", "transpose"),
    "binary_conv.beta.fc.2.weight": ("conv{j}/input_shift/fc2", "kernel", "transpose"),
    "prelu.weight": ("act{j}", "slope", ""),
}
_UNIT_KEYS.update({k: v for k, v in birealnet._UNIT_KEYS.items()  # pylint: disable=protected-access
                   if k.startswith(("bn1.", "downsample."))})
_TOP_KEYS = birealnet._TOP_KEYS  # pylint: disable=protected-access


def from_official_state_dict(state_dict: Mapping[str, Any], *,
                             binary_weights: bool = True) -> dict[str, dict]:
  """Flax variables of ``birealnet18_sdbnn`` from SD-BNN's ImageNet weights.

  Reads the ``state_dict`` of the official ``birealnet18`` (units
  ``layer{s}.{u}``; flat latent weights ``binary_conv.weights`` of shape
  ``(n, 1)``; ASD as ``binary_conv.beta.fc.{0,2}``), with or without the
  ``'module.'`` prefix. Unit ``u`` of stage ``s`` becomes ``conv{u % 2 + 1}``
  of ``stage{s}_block{u // 2 + 1}``. The map is linear (reshapes and
  transposes), so it also converts gradients.

  Args:
    state_dict: name -> array (numpy or CPU torch tensors).
    binary_weights: ``False`` for stage 1 (``kernel_quantizer='identity'``),
      whose model has no WSD ``a``: the code's unused ``alpha`` is dropped.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` nested dicts of numpy arrays.

  Raises:
    ValueError: keys that are not SD-BNN ImageNet parameters (all listed).
  """
  # A flat latent kernel's shape comes from its unit's BatchNorm.
  widths = {torch_convert.strip_module(k)[:-len(".bn1.weight")]: np.shape(v)[0]
            for k, v in state_dict.items() if k.endswith(".bn1.weight")}

  def place(name: str, value: np.ndarray):
    spec, prefix, j = birealnet.unit_spec(name, _UNIT_KEYS, _TOP_KEYS)
    if spec is None:
      return None
    module, leaf, how = spec
    if leaf == "a" and not binary_weights:
      return torch_convert.DROP
    if how == "flat_oihw":
      cout = widths[".".join(name.split(".")[:2])]
      value = np.transpose(value.reshape(cout, value.size // (9 * cout), 3, 3), (2, 3, 1, 0))
    else:
      value = torch_convert.transform(value, how)
    return prefix + module.format(j=j), leaf, value

  return torch_convert.to_variables(
      state_dict, place, "SD-BNN's ImageNet ResNet-18 (imagenet/birealnet.py)")
