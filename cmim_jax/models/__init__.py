"""Binary networks (CIFAR; ImageNet ``birealnet18``) and their full-precision
twins, looked up by name.

Every model is a Flax module with fields ``num_classes``, ``input_quantizer``,
``kernel_quantizer``, ``bn_axis_name`` and ``dtype``, called as
``model.apply(variables, x, train=..., schedule=None | {'k': k, 't': t},
mutable=[...]) -> f32[B, num_classes]``. Binary defaults are IR-Net's
(``'ede_sign'`` inputs, ``'irnet_weight'`` kernels); ``*_fp`` names use the
``'identity'`` quantizers. ``schedule=None`` stands for k = t = 1, which leaves
the forward pass unchanged: models initialise and evaluate without one, but
training must pass ``binarize.ede_schedule(epoch / num_epochs)``.

Binary layers sow ``'a_F'``/``'a_B'`` into ``'binary_acts'`` (the FP twins sow
nothing); ``model.init`` returns that collection too: keep only ``params`` and
``batch_stats`` from it.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from cmim_jax.models import resnet, vgg
from cmim_jax.models.resnet import (BasicBlock, BiRealBlock, BiRealNet18, ResNet, ResNet18,
                                    ResNet20)
from cmim_jax.models.vgg import VGGSmall

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet.resnet18,
    "resnet18_fp": resnet.resnet18_fp,
    "resnet18_realds": resnet.resnet18_realds,
    "resnet18_realds_fp": resnet.resnet18_realds_fp,
    "resnet18_sdbnn": resnet.resnet18_sdbnn,
    "resnet20": resnet.resnet20,
    "resnet20_fp": resnet.resnet20_fp,
    "resnet20_sdbnn": resnet.resnet20_sdbnn,
    "birealnet18": resnet.birealnet18,
    "birealnet18_fp": resnet.birealnet18_fp,
    "vgg_small": vgg.vgg_small,
    "vgg_small_fp": vgg.vgg_small_fp,
    "vgg_small_sdbnn": vgg.vgg_small_sdbnn,
}

MODEL_NAMES = tuple(_MODELS)


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds the model registered as ``name``.

  Args:
    name: one of ``MODEL_NAMES``.
    **kwargs: module fields overriding the variant's (``num_classes``,
      ``input_quantizer``, ``kernel_quantizer``, ``bn_axis_name``, ``dtype``, ...).

  Returns:
    An unbound ``flax.linen.Module``.

  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  try:
    factory = _MODELS[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}") from None
  return factory(**kwargs)


__all__ = ["MODEL_NAMES", "get_model", "ResNet", "ResNet18", "ResNet20", "BiRealNet18",
           "BasicBlock", "BiRealBlock", "VGGSmall"]
