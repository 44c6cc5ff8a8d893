r"""``kd``: knowledge distillation from a frozen teacher's logits.

.. math::
   L = T^2 \cdot \frac{1}{N}\sum_i \mathrm{KL}\big(\mathrm{softmax}(t_i/T)\,\|\,
       \mathrm{softmax}(s_i/T)\big)

with ``t`` the teacher's and ``s`` the student's logits, the mean over the
global batch. The ``T^2`` factor is Hinton et al.'s (2015): it keeps the
gradient's size independent of ``T``; at ``T = 1`` it is 1 and the term is
ReActNet's distributional loss, whose value (a cross entropy with soft
targets) is larger by the teacher's entropy, a constant without gradient.
Config section ``config.kd``: ``weight``, ``temperature``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cmim_jax.objectives.base import Objective, register


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float,
            axis_name: str | None = None) -> jax.Array:
  """``T^2 * mean_i KL(softmax(t_i/T) || softmax(s_i/T))``; no gradient to the teacher.

  Args:
    student_logits: f32[b, K].
    teacher_logits: f32[b, K].
    temperature: T > 0.
    axis_name: when given, the mean is over the global batch (equal shares).
  """
  if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
    raise ValueError(f"kd_loss expects student and teacher logits of one shape [B, K]; got "
                     f"{student_logits.shape} and {teacher_logits.shape} (do the teacher and "
                     "the student have the same number of classes?).")
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_p_t = jax.nn.log_softmax(t)
  log_p_s = jax.nn.log_softmax(s)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  loss = temperature ** 2 * jnp.mean(kl)
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return loss


@dataclasses.dataclass(frozen=True)
class KD(Objective):
  """Attributes: temperature (T)."""
  temperature: float = 1.0
  needs = ("teacher_logits",)

  def loss(self, params, state, batch, *, aux, axis_name):
    del params, batch
    return kd_loss(aux["logits"], aux["teacher_logits"], temperature=self.temperature,
                   axis_name=axis_name), state, {}

  def describe(self) -> str:
    return f"KL(teacher || student) at T={self.temperature}, times T^2"


@register("kd")
def _build(context):
  t = context.config.kd.temperature
  if not t > 0:
    raise ValueError(f"config.kd.temperature={t!r} is invalid: must be > 0.")
  return KD(temperature=float(t))
