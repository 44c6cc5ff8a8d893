"""A registered backbone with MoCo v2's MLP projection head, as one model.

MoCo v2 (Chen et al. 2020) replaces a ResNet's classifier ``fc`` with
``Linear(d, d) -> ReLU -> Linear(d, 128)``; S2-BNN's frozen teacher is that
network (torchvision ResNet-50, ``d = 2048``) and its 128-d output ``z_T``
is what guided distribution calibration matches (``softmax(z_T / tau)``).
:class:`MLPHeadNet` builds the same thing from any registered backbone: the
backbone's own ``fc`` becomes the head's first layer (``head_hidden`` wide),
then ReLU and ``proj`` (``embed_dim`` wide).

What the trainer sees when this model is a teacher (``config.teacher``):

* its output (``aux['teacher_logits']``) is the ``embed_dim``-wide
  embedding, *before* the L2 normalisation MoCo applies to it (the official
  MoCo and S2-BNN code normalise ``q`` right after the encoder; an objective
  that follows them normalises it itself);
* ``aux['teacher_features']`` (the input of the backbone's ``fc``, see
  ``train._apply``) is the backbone's pooled feature (2048-d for ResNet-50),
  what a linear probe reads.

``num_classes`` is not used: the width of the output is ``embed_dim``,
whatever the data's classes (every registered model has the field, and the
trainer sets it from the data).

``tv_resnet50_moco`` is the MoCo v2 ResNet-50;
:mod:`cmim_jax.models.moco_convert` fills it from a PyTorch MoCo checkpoint.

References:
  Chen et al., "Improved Baselines with Momentum Contrastive Learning", 2020;
  Shen et al., "S2-BNN", CVPR 2021.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmim_jax import binarize
from cmim_jax.models import registry

Array = jax.Array


class MLPHeadNet(nn.Module):
  """``proj(relu(backbone(x)))`` with the backbone's ``fc`` as the hidden layer.

  Attributes:
    backbone: a registered model name (its classifier must be an ``nn.Dense``
      named ``fc``, the convention of every model here).
    head_hidden: width of the hidden layer (the backbone's ``fc``); MoCo v2
      uses the backbone's feature width.
    embed_dim: width of the output embedding.
    num_classes: unused (see the module docstring).
    input_quantizer: passed to the backbone; ``None`` keeps the backbone's.
    kernel_quantizer: passed to the backbone; ``None`` keeps the backbone's.
    bn_axis_name: passed to the backbone.
    dtype: computation dtype (the output is float32).
  """
  backbone: str = "tv_resnet50"
  head_hidden: int = 2048
  embed_dim: int = 128
  num_classes: int = 128
  input_quantizer: Optional[binarize.QuantizerLike] = None
  kernel_quantizer: Optional[binarize.QuantizerLike] = None
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool,
               schedule: Optional[Mapping[str, Any]] = None) -> Array:
    """The ``embed_dim``-wide embedding ``f32[B, embed_dim]`` of NHWC images."""
    # get_model's first parameter is called name: the module name goes to the factory.
    factory = registry._factory(self.backbone)  # pylint: disable=protected-access
    quantizers = {k: v for k, v in (("input_quantizer", self.input_quantizer),
                                    ("kernel_quantizer", self.kernel_quantizer))
                  if v is not None}
    net = factory(num_classes=self.head_hidden, bn_axis_name=self.bn_axis_name,
                  dtype=self.dtype, name="backbone", **quantizers)
    h = net(x, train=train, schedule=schedule)
    z = nn.Dense(self.embed_dim, dtype=self.dtype, name="proj")(nn.relu(h))
    return jnp.asarray(z, jnp.float32)


# Full precision, stated here too so that tools reading the wrapper's own
# fields (export, summary) see it as such.
tv_resnet50_moco = registry.register("tv_resnet50_moco")(
    functools.partial(MLPHeadNet, backbone="tv_resnet50", head_hidden=2048, embed_dim=128,
                      input_quantizer="identity", kernel_quantizer="identity"))
