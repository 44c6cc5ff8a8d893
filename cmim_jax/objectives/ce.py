"""``ce``: softmax cross entropy of the student's logits with the labels."""

from __future__ import annotations

import dataclasses

from cmim_jax import losses
from cmim_jax.objectives.base import Objective, register


@dataclasses.dataclass(frozen=True)
class CrossEntropy(Objective):
  """Mean cross entropy over this device's examples (the step ``pmean``-s it)."""

  def loss(self, params, state, batch, *, aux, axis_name):
    del params, batch, axis_name
    return losses.cross_entropy(aux["logits"], aux["labels"]), state, {}


@register("ce")
def _build(context):
  del context
  return CrossEntropy()
