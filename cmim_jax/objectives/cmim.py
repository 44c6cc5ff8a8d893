"""``cmim``: the CMIM paper's loss, symmetric InfoNCE between the projected
binary and latent real activations of the tapped layers, with the negatives
of the global batch (``losses.cmim_loss``). Config section ``config.cmim``:
``weight``, ``temperature``, ``layers``, ``embed_dim``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cmim_jax import losses
from cmim_jax import variables as variables_lib
from cmim_jax.objectives.base import Objective, register


@dataclasses.dataclass(frozen=True)
class CMIM(Objective):
  """Attributes: heads (the projection heads of the taps), temperature."""
  heads: losses.CMIMHeads
  temperature: float
  needs = ("binary_acts",)

  @property
  def layers(self) -> tuple[str, ...]:
    return tuple(self.heads.layers)

  def init(self, key, example):
    taps = losses.tapped_activations(example["binary_acts"], self.layers)
    return self.heads.init(key, taps)["params"], {}

  def loss(self, params, state, batch, *, aux, axis_name):
    del batch
    taps = losses.tapped_activations(aux["binary_acts"], self.layers)
    embeddings = self.heads.apply({"params": params}, taps)
    total, per_layer = losses.cmim_loss(embeddings, temperature=self.temperature,
                                        axis_name=axis_name)
    return total, state, per_layer

  def describe(self) -> str:
    return f"InfoNCE on {list(self.layers)}, tau {self.temperature}, in-batch negatives"


def binary_layer_paths(model, image_shape) -> list[str]:
  """The paths of the model's binary layers, from a shape-only forward pass."""
  probe = model.clone(bn_axis_name=None)
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)

  def sown(x):
    variables = variables_lib.init_variables(probe, jax.random.PRNGKey(0), x)
    return probe.apply(variables, x, train=False, mutable=[losses.BINARY_ACTS])[1]
  return losses.binary_layer_paths(jax.eval_shape(sown, x).get(losses.BINARY_ACTS, {}))


@register("cmim")
def _build(context):
  c = context.config.cmim
  if c.temperature <= 0:
    raise ValueError(f"config.cmim.temperature={c.temperature!r} is invalid: must be > 0.")
  if c.embed_dim <= 0:
    raise ValueError(f"config.cmim.embed_dim={c.embed_dim!r} is invalid: must be > 0.")
  paths = binary_layer_paths(context.model, context.info.image_shape)
  if not paths:
    raise ValueError(f"model {context.config.model.name!r} has no binary layers to tap; drop "
                     "'cmim' from config.objectives (or set cmim.weight=0) for "
                     "full-precision models.")
  layers = losses.select_layers(paths, c.layers)
  return CMIM(heads=losses.CMIMHeads(layers=tuple(layers), embed_dim=int(c.embed_dim)),
              temperature=float(c.temperature))
