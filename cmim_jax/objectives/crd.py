r"""``crd``: CMIM's released-code form, CRD-style contrast with a frozen teacher.

The student's and the teacher's penultimate features (the input of the
classifier ``fc``) go through trained linear heads to ``embed_dim`` and L2
normalisation: ``s_i``, ``t_i``. Two momentum memory banks hold past ``s``
and ``t`` of every training example (:mod:`.memory`). For example ``i`` with
dataset index ``n_i`` and ``K`` negatives ``n_{i,1..K}`` drawn among the
other examples, each side contrasts its current embedding against the other
side's bank (row ``n_i`` is the positive)::

    log P(j) = t_i . bank_S[j] / tau - log Z_T     (teacher side; student alike)
    L_T = -mean_i [ log(P(n_i) / (P(n_i) + K/M))
                    + sum_k log((K/M) / (P(n_{i,k}) + K/M)) ]

with ``M`` the number of training examples (NCE with noise ``1/M``) and
``Z = M * mean(exp(. / tau))`` fixed from the first batch. ``L = L_S + L_T``.
Then the banks move: ``bank[n] <- normalize(m * bank[n] + (1 - m) * new)``.

Fixed here compared with the released code: its heads are never optimised
(here they are trained with the network), and its student runs forward
twice per step (here once: the features come from the same forward pass as
the logits). Negatives whose last seen label equals the sample's are dropped
(``crd.class_aware``; the released code samples other classes exactly, from
labels it knows in advance). The banks start as random unit rows.
Config section ``config.crd``: ``weight``, ``embed_dim``, ``num_negatives``,
``temperature``, ``momentum``, ``class_aware``.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmim_jax import losses
from cmim_jax.objectives import memory
from cmim_jax.objectives.base import Objective, register


class _Embed(nn.Module):
  embed_dim: int

  @nn.compact
  def __call__(self, x):
    return losses.l2_normalize(nn.Dense(self.embed_dim, name="proj")(x.astype(jnp.float32)))


def nce_side(anchor, bank, own, negatives, log_z, *, temperature, num_data, keep=None):
  """One side's NCE loss (mean over this device's rows) and its ``exp`` scores' mean.

  Args:
    anchor: ``f32[b, D]`` current embeddings of one side.
    bank: ``f32[M, D]`` the other side's bank (no gradient).
    own: ``i32[b]`` dataset indices (the positives' rows).
    negatives: ``i32[b, K]`` drawn rows.
    log_z: the fixed normaliser ``log Z``.
    temperature: tau.
    num_data: M.
    keep: optional ``bool[b, K]`` (False drops a negative).

  Returns:
    ``(loss, mean of exp(score / tau))`` (the latter sets ``Z`` on the first batch).
  """
  bank = jax.lax.stop_gradient(bank)
  rows = jnp.concatenate([own[:, None], negatives], axis=1)
  scores = jnp.einsum("bd,bkd->bk", anchor, bank[rows]) / temperature
  log_p = scores - log_z
  k = negatives.shape[1]
  log_noise = math.log(k / num_data)
  log_d1 = log_p[:, 0] - jnp.logaddexp(log_p[:, 0], log_noise)
  log_d0 = log_noise - jnp.logaddexp(log_p[:, 1:], log_noise)
  if keep is not None:
    log_d0 = jnp.where(keep, log_d0, 0.0)
  loss = -jnp.mean(log_d1 + jnp.sum(log_d0, axis=1))
  return loss, jnp.mean(jnp.exp(scores))


@dataclasses.dataclass(frozen=True)
class CRD(Objective):
  """Attributes: embed_dim, num_data (M), num_negatives (K), temperature, momentum,
  class_aware."""
  embed_dim: int = 128
  num_data: int = 0
  num_negatives: int = 4096
  temperature: float = 0.1
  momentum: float = 0.5
  class_aware: bool = True
  needs = ("features", "teacher_features")

  def init(self, key, example):
    ks, kt, kbs, kbt, kd = jax.random.split(key, 5)
    head = _Embed(self.embed_dim)
    params = {"student": head.init(ks, example["features"])["params"],
              "teacher": head.init(kt, example["teacher_features"])["params"]}
    state = {"bank_s": memory.random_bank(kbs, self.num_data, self.embed_dim),
             "bank_t": memory.random_bank(kbt, self.num_data, self.embed_dim),
             "labels": jnp.full((self.num_data,), -1, jnp.int32),
             "log_z_s": jnp.zeros(()), "log_z_t": jnp.zeros(()),
             "key": kd, "count": jnp.zeros((), jnp.int32)}
    return params, state

  def loss(self, params, state, batch, *, aux, axis_name):
    index, labels = memory.require_index(batch, "the 'crd' objective"), aux["labels"]
    head = _Embed(self.embed_dim)
    s = head.apply({"params": params["student"]}, aux["features"])
    t = head.apply({"params": params["teacher"]},
                   jax.lax.stop_gradient(aux["teacher_features"]))
    negatives, keep = memory.draw_step_negatives(
        state, index, labels, num_data=self.num_data, num=self.num_negatives,
        class_aware=self.class_aware, axis_name=axis_name)
    first = state["count"] == 0

    def side(anchor, bank, log_z):
      # Z from the first batch: the scores' mean over the global batch, times M.
      _, mean_exp = nce_side(anchor, bank, index, negatives, 0.0, temperature=self.temperature,
                             num_data=self.num_data, keep=keep)
      if axis_name is not None:
        mean_exp = jax.lax.pmean(mean_exp, axis_name)
      new_log_z = jax.lax.stop_gradient(jnp.where(
          first, jnp.log(mean_exp) + math.log(self.num_data), log_z))
      value, _ = nce_side(anchor, bank, index, negatives, new_log_z,
                          temperature=self.temperature, num_data=self.num_data, keep=keep)
      if axis_name is not None:
        value = jax.lax.pmean(value, axis_name)
      return value, new_log_z

    loss_t, log_z_t = side(t, state["bank_s"], state["log_z_t"])
    loss_s, log_z_s = side(s, state["bank_t"], state["log_z_s"])
    all_index = memory.gather_global(index, axis_name)
    new_state = {
        "bank_s": memory.update_bank(state["bank_s"], all_index,
                                     memory.gather_global(s, axis_name), self.momentum),
        "bank_t": memory.update_bank(state["bank_t"], all_index,
                                     memory.gather_global(t, axis_name), self.momentum),
        "log_z_s": log_z_s, "log_z_t": log_z_t,
        **memory.advance_draws(state, all_index, labels, axis_name)}
    return loss_s + loss_t, new_state, {"student": loss_s, "teacher": loss_t}

  def describe(self) -> str:
    return (f"CRD-style NCE, teacher and student penultimate features -> {self.embed_dim}-d, "
            f"{self.num_negatives} negatives from momentum-{self.momentum} banks of "
            f"{self.num_data} rows, tau {self.temperature}")


@register("crd")
def _build(context):
  c = context.config.crd
  num_data = int(context.info.num_train)
  if not 0 < c.num_negatives < num_data:
    raise ValueError(f"config.crd.num_negatives={c.num_negatives} must be > 0 and below the "
                     f"{num_data} training examples (the banks' rows).")
  if not c.temperature > 0 or not 0.0 <= c.momentum < 1.0 or not c.embed_dim > 0:
    raise ValueError(f"config.crd: temperature ({c.temperature}) must be > 0, momentum "
                     f"({c.momentum}) in [0, 1), embed_dim ({c.embed_dim}) > 0.")
  return CRD(embed_dim=int(c.embed_dim), num_data=num_data, num_negatives=int(c.num_negatives),
             temperature=float(c.temperature), momentum=float(c.momentum),
             class_aware=bool(c.class_aware))
