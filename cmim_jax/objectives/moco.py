r"""``moco``: MoCo v2 (He et al. 2020; Chen et al. 2020), label-free.

The student's embedding of view 0 is ``q = normalize(head(f))``, with ``f``
its penultimate features (the input of ``fc``) and ``head`` an MLP
``Dense(hidden) -> ReLU -> Dense(embed_dim)`` owned by this term. A key
encoder, the exponential moving average of the student and its head,

.. math::  \theta_k \leftarrow m\,\theta_k + (1 - m)\,\theta_q

(before the keys are computed, with the student's parameters before this
step, as the reference code's ``_momentum_update_key_encoder``), embeds
view 1: ``k = normalize(head_k(f_k(view_1)))``, without gradient. With a
queue ``Q`` of ``K`` past keys,

.. math::  L = -\frac1N \sum_i \log \frac{\exp(q_i\cdot k_i/\tau)}
                 {\exp(q_i\cdot k_i/\tau) + \sum_j \exp(q_i\cdot Q_j/\tau)}

over the global batch; then the global batch's keys (``all_gather``, in
global order) replace the oldest ``N`` rows of the queue.

BatchNorm of the key encoder: **global** (cross-device) BatchNorm, not the
reference code's shuffled BN. The leak MoCo's shuffle guards against is a
device's sub-batch statistics telling a query which key is its positive;
with statistics over the whole global batch (SimCLR's and MoCo v3's remedy)
no device has a sub-batch of its own, every device computes exactly what a
single device would (so 8 devices equal 1, tested), and the result is the
reference code's on one GPU. Shuffled BN depends on the device count by
design. The key encoder keeps its own running statistics (its state).

At the first step the key encoder is a copy of the student (MoCo's own
initialisation), so a run started with ``config.init_from`` (S2-BNN's step
2) starts its key encoder from the loaded weights; its queue starts as
random unit rows (the reference code's step 2 loads step 1's queue too).
Config section ``config.moco``: ``weight``, ``temperature``, ``momentum``,
``queue_size``, ``embed_dim``, ``hidden_dim``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmim_jax import losses
from cmim_jax.objectives import memory
from cmim_jax.objectives.base import Objective, register


class MLPHead(nn.Module):
  """MoCo v2's projection head: ``Dense(hidden) -> ReLU -> Dense(dim)``, unnormalised."""
  hidden: int
  dim: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name="fc1")(x.astype(jnp.float32)))
    return nn.Dense(self.dim, name="fc2")(x)


def embed(head_params, features, *, hidden: int, dim: int) -> jax.Array:
  """``normalize(head(features))``, the unit embedding MoCo and calibration compare."""
  return losses.l2_normalize(MLPHead(hidden, dim).apply({"params": head_params}, features))


def moco_infonce(q: jax.Array, k: jax.Array, queue: jax.Array, *, temperature: float,
                 axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """MoCo's InfoNCE, the mean over the global batch, and its (K+1)-way accuracy.

  Args:
    q: ``f32[b, D]`` unit queries (differentiable).
    k: ``f32[b, D]`` unit positive keys (no gradient).
    queue: ``f32[K, D]`` unit negative keys (no gradient).
    temperature: tau.
    axis_name: when given, the means are over the global batch.
  """
  k, queue = jax.lax.stop_gradient(k), jax.lax.stop_gradient(queue)
  logits = jnp.concatenate([jnp.sum(q * k, -1, keepdims=True), q @ queue.T], 1) / temperature
  loss = jnp.mean(jax.nn.logsumexp(logits, 1) - logits[:, 0])
  accuracy = jnp.mean((jnp.argmax(logits, 1) == 0).astype(jnp.float32))
  if axis_name is not None:
    loss, accuracy = jax.lax.pmean((loss, accuracy), axis_name)
  return loss, accuracy


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rows ``ptr .. ptr + N`` of the queue become ``keys``; the pointer moves on (mod K)."""
  n = keys.shape[0]
  queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, jnp.zeros_like(ptr)))
  return queue, (ptr + n) % queue.shape[0]


@dataclasses.dataclass(frozen=True)
class MoCo(Objective):
  """Attributes: temperature, momentum, queue_size, embed_dim, hidden_dim (0 = features')."""
  temperature: float = 0.2
  momentum: float = 0.999
  queue_size: int = 65536
  embed_dim: int = 128
  hidden_dim: int = 0
  needs = ("features", "second_view", "student")
  uses_labels = False

  def hidden(self, features) -> int:
    return self.hidden_dim or int(features.shape[-1])

  def init(self, key, example):
    head_key, queue_key = jax.random.split(key)
    features, student = example["features"], example["student"]
    head = MLPHead(self.hidden(features), self.embed_dim).init(head_key, features)["params"]
    state = {"key_params": {"model": student.params, "head": head},
             "key_batch_stats": student.batch_stats,
             "queue": memory.random_bank(queue_key, self.queue_size, self.embed_dim),
             "ptr": jnp.zeros((), jnp.int32), "count": jnp.zeros((), jnp.int32)}
    return {"head": head}, state

  def loss(self, params, state, batch, *, aux, axis_name):
    del batch
    hidden = self.hidden(aux["features"])
    q = embed(params["head"], aux["features"], hidden=hidden, dim=self.embed_dim)
    student = aux["student"]
    current = {"model": student.params, "head": jax.lax.stop_gradient(params["head"])}
    first = state["count"] == 0
    m = self.momentum
    key_params = jax.tree.map(lambda k, s: jnp.where(first, s, m * k + (1 - m) * s),
                              state["key_params"], current)
    key_stats = jax.tree.map(lambda k, s: jnp.where(first, s, k), state["key_batch_stats"],
                             student.batch_stats)
    _, features_k, key_stats = student.apply(key_params["model"], key_stats, aux["second_view"])
    k = jax.lax.stop_gradient(embed(key_params["head"], features_k, hidden=hidden,
                                    dim=self.embed_dim))
    value, accuracy = moco_infonce(q, k, state["queue"], temperature=self.temperature,
                                   axis_name=axis_name)
    queue, ptr = enqueue(state["queue"], state["ptr"], memory.gather_global(k, axis_name))
    if axis_name is not None:  # Global BatchNorm made them equal; typed replicated here.
      key_stats = jax.lax.pmean(key_stats, axis_name)
    new_state = {"key_params": key_params, "key_batch_stats": jax.lax.stop_gradient(key_stats),
                 "queue": queue, "ptr": ptr, "count": state["count"] + 1}
    return value, new_state, {"accuracy": accuracy}

  def describe(self) -> str:
    return (f"MoCo v2 InfoNCE, tau {self.temperature}, key encoder EMA {self.momentum} with "
            f"global BatchNorm, queue of {self.queue_size} keys, MLP head -> {self.embed_dim}-d")


@register("moco")
def _build(context):
  c = context.config.moco
  if not c.temperature > 0 or not 0.0 <= c.momentum < 1.0:
    raise ValueError(f"config.moco: temperature ({c.temperature}) must be > 0 and momentum "
                     f"({c.momentum}) in [0, 1).")
  if not c.embed_dim > 0 or c.hidden_dim < 0:
    raise ValueError(f"config.moco: embed_dim ({c.embed_dim}) must be > 0 and hidden_dim "
                     f"({c.hidden_dim}) >= 0 (0 = the features' size).")
  batch = int(context.config.batch_size)
  if c.queue_size < batch or c.queue_size % batch:
    raise ValueError(f"config.moco.queue_size={c.queue_size} must be a multiple of the global "
                     f"batch_size={batch} (each step replaces one batch of keys), e.g. "
                     f"{max(1, 65536 // batch) * batch}.")
  return MoCo(temperature=float(c.temperature), momentum=float(c.momentum),
              queue_size=int(c.queue_size), embed_dim=int(c.embed_dim),
              hidden_dim=int(c.hidden_dim))
