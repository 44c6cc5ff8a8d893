"""``cmim``: the CMIM paper's loss, symmetric InfoNCE between the projected
binary and latent real activations of the tapped layers.

Negatives (``config.cmim.negatives``): ``'batch'``, the other samples of the
global batch (``losses.cmim_loss``, gathered across devices); or
``'memory'``, ``cmim.num_negatives`` entries per sample of two momentum
memory banks per tapped layer (past ``z_B`` and ``z_F`` of every training
example, by dataset index; :mod:`.memory`), which gives the "exponentially
large" negative sets the paper speaks of. ``cmim.class_aware`` drops drawn
negatives whose (last seen) label is the sample's. Config section
``config.cmim``: ``weight``, ``temperature``, ``layers``, ``embed_dim``,
``negatives``, ``num_negatives``, ``momentum``, ``class_aware``.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from cmim_jax import losses
from cmim_jax import variables as variables_lib
from cmim_jax.objectives import memory
from cmim_jax.objectives.base import Objective, register

NEGATIVES = ("batch", "memory")


def _key(layer: str) -> str:
  # Checkpoint paths join keys with '/'; a layer path must stay one key.
  return re.sub(r"[^0-9A-Za-z_]", "_", layer)


@dataclasses.dataclass(frozen=True)
class CMIM(Objective):
  """Attributes: heads (the projection heads of the taps), temperature, and
  for ``negatives='memory'``: num_data (bank rows), num_negatives, momentum,
  class_aware."""
  heads: losses.CMIMHeads
  temperature: float
  negatives: str = "batch"
  num_data: int = 0
  num_negatives: int = 0
  momentum: float = 0.5
  class_aware: bool = False
  needs = ("binary_acts",)

  @property
  def layers(self) -> tuple[str, ...]:
    return tuple(self.heads.layers)

  def init(self, key, example):
    heads_key, bank_key, draw_key = jax.random.split(key, 3)
    taps = losses.tapped_activations(example["binary_acts"], self.layers)
    params = self.heads.init(heads_key, taps)["params"]
    if self.negatives == "batch":
      return params, {}
    d = self.heads.embed_dim
    banks = {}
    for i, layer in enumerate(self.layers):
      kb, kf = jax.random.split(jax.random.fold_in(bank_key, i))
      banks[_key(layer)] = {"b": memory.random_bank(kb, self.num_data, d),
                            "f": memory.random_bank(kf, self.num_data, d)}
    state = {"banks": banks, "labels": jnp.full((self.num_data,), -1, jnp.int32),
             "key": draw_key, "count": jnp.zeros((), jnp.int32)}
    return params, state

  def loss(self, params, state, batch, *, aux, axis_name):
    taps = losses.tapped_activations(aux["binary_acts"], self.layers)
    embeddings = self.heads.apply({"params": params}, taps)
    if self.negatives == "batch":
      total, per_layer = losses.cmim_loss(embeddings, temperature=self.temperature,
                                          axis_name=axis_name)
      return total, state, per_layer
    return self._memory_loss(embeddings, state, batch, aux["labels"], axis_name)

  def _memory_loss(self, embeddings, state, batch, labels, axis_name):
    index = memory.require_index(batch, "cmim.negatives='memory'")
    negatives, keep = memory.draw_step_negatives(
        state, index, labels, num_data=self.num_data, num=self.num_negatives,
        class_aware=self.class_aware, axis_name=axis_name)
    all_index = memory.gather_global(index, axis_name)
    per_layer, banks = {}, {}
    for layer, (z_b, z_f) in embeddings.items():
      bank = state["banks"][_key(layer)]
      per_layer[layer] = memory.memory_infonce(
          z_b, z_f, bank["b"], bank["f"], negatives, temperature=self.temperature,
          keep=keep, axis_name=axis_name)
      banks[_key(layer)] = {
          "b": memory.update_bank(bank["b"], all_index, memory.gather_global(z_b, axis_name),
                                  self.momentum),
          "f": memory.update_bank(bank["f"], all_index, memory.gather_global(z_f, axis_name),
                                  self.momentum)}
    new_state = {"banks": banks, **memory.advance_draws(state, all_index, labels, axis_name)}
    return sum(per_layer.values()), new_state, per_layer

  def describe(self) -> str:
    if self.negatives == "batch":
      return f"InfoNCE on {list(self.layers)}, tau {self.temperature}, in-batch negatives"
    return (f"InfoNCE on {list(self.layers)}, tau {self.temperature}, {self.num_negatives} "
            f"negatives per sample from momentum-{self.momentum} memory banks of "
            f"{self.num_data} rows{', class-aware' if self.class_aware else ''}")


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
  if c.negatives not in NEGATIVES:
    raise ValueError(f"config.cmim.negatives={c.negatives!r} is not one of {NEGATIVES}.")
  num_data = int(context.info.num_train) if c.negatives == "memory" else 0
  if c.negatives == "memory" and not 0 < c.num_negatives < num_data:
    raise ValueError(f"config.cmim.num_negatives={c.num_negatives} must be > 0 and below the "
                     f"{num_data} training examples (the bank's rows).")
  if not 0.0 <= c.momentum < 1.0:
    raise ValueError(f"config.cmim.momentum={c.momentum} must be in [0, 1).")
  return CMIM(heads=losses.CMIMHeads(layers=tuple(layers), embed_dim=int(c.embed_dim)),
              temperature=float(c.temperature), negatives=str(c.negatives),
              num_data=num_data, num_negatives=int(c.num_negatives) if num_data else 0,
              momentum=float(c.momentum), class_aware=bool(c.class_aware))
