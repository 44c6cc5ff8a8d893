"""Binary networks (CIFAR; ImageNet ``birealnet18``, ``reactnet18``,
``birealnet18_sdbnn``, ``reactnet_a``), their full-precision twins and
torchvision-layout FP ImageNet ResNets (``tv_resnet18/34/50``), registered by
name (see :mod:`cmim_jax.models.registry`).

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

A model of your own: decorate its class or factory with
``@models.register("my_net")`` in your module, list that module in
``config.imports`` and set ``config.model.name = "my_net"``;
``models.from_config(config.model, num_classes=...)`` then sets its fields from
``config.model`` (README, "Extending").
"""
from __future__ import annotations

from cmim_jax import layers as _layers
from cmim_jax.models import registry
from cmim_jax.models.registry import (config_section, default_model, from_config,
                                      get_model, import_modules, model_fields, names,
                                      part_names, register, register_part)
# Importing the model modules registers their models.
from cmim_jax.models import birealnet, reactnet_a, resnet, sdbnn_imagenet, tv_resnet, vgg  # noqa: E402  pylint: disable=g-bad-import-order
from cmim_jax.models.birealnet import BiRealNet18, BiRealNetBlock, ReActNet18
from cmim_jax.models.reactnet_a import ReActNetA
from cmim_jax.models.resnet import BasicBlock, BiRealBlock, ResNet, ResNet18, ResNet20
from cmim_jax.models.tv_resnet import TVResNet
from cmim_jax.models.vgg import VGGSmall
# After the backbones it wraps (tv_resnet50_moco).
from cmim_jax.models import embedding  # noqa: E402  pylint: disable=g-bad-import-order
from cmim_jax.models.embedding import MLPHeadNet

register_part("ASD")(_layers.ASD)

# The built-in models; names() also lists those registered later.
MODEL_NAMES = names()

__all__ = ["MODEL_NAMES", "names", "register", "register_part", "part_names", "get_model",
           "default_model", "model_fields", "from_config", "config_section",
           "import_modules", "ResNet", "ResNet18", "ResNet20", "BiRealNet18", "ReActNet18",
           "ReActNetA", "BasicBlock", "BiRealBlock", "BiRealNetBlock", "TVResNet", "VGGSmall",
           "MLPHeadNet"]
