r"""``calibration``: S2-BNN's guided distribution calibration, label-free.

A frozen real-valued self-supervised teacher and the student see the same
view. Each turns it into a unit embedding: the teacher with the projection
head its own run trained (``calibration.teacher_head``: the ``moco`` head of a
run trained with ``moco``) or, for a teacher whose output is the embedding
(``tv_resnet50_moco`` from ``python -m cmim_jax.models.moco_convert``), its
normalised output (``teacher_head=''``; ``'auto'`` picks by the teacher
run's ``config.objectives``), the student with the ``moco``
term's head when this run has one (S2-BNN's "MoCo v2 + distillation": one
head for both losses) and with a head of its own otherwise ("distillation
only"). Then, over the ``D`` embedding dimensions,

.. math::  L = -\frac1N \sum_i \sum_d \mathrm{softmax}(z^T_i/\tau)_d\,
               \log\mathrm{softmax}(z^S_i/\tau)_d

the mean over the global batch, ``tau = 0.2``; no gradient to the teacher.
It is the reference code's ``DistributionLoss`` applied to
``q_student / T`` and ``q_teacher / T``. Config section
``config.calibration``: ``weight``, ``temperature``, ``teacher_head``; the
heads' sizes are ``config.moco``'s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cmim_jax import losses
from cmim_jax.objectives import base
from cmim_jax.objectives.base import Objective, register
from cmim_jax.objectives.moco import MLPHead, embed


def calibration_loss(student: jax.Array, teacher: jax.Array, *, temperature: float,
                     axis_name: str | None = None) -> jax.Array:
  """``-mean_i sum_d softmax(t_i/tau)_d log_softmax(s_i/tau)_d``; no gradient to ``teacher``.

  Args:
    student: ``f32[b, D]`` the student's unit embeddings.
    teacher: ``f32[b, D]`` the teacher's.
    temperature: tau.
    axis_name: when given, the mean is over the global batch.
  """
  if student.shape != teacher.shape or student.ndim != 2:
    raise ValueError(f"calibration needs student and teacher embeddings of one shape [B, D]; "
                     f"got {student.shape} and {teacher.shape} (set config.moco.embed_dim to "
                     "the teacher's embedding size).")
  p_t = jax.nn.softmax(jax.lax.stop_gradient(teacher).astype(jnp.float32) / temperature)
  log_p_s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature)
  loss = -jnp.mean(jnp.sum(p_t * log_p_s, -1))
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return loss


@dataclasses.dataclass(frozen=True)
class Calibration(Objective):
  """Attributes: temperature, shared_head (the term whose head the student uses, '' =
  own), teacher_head (the teacher run's term whose head embeds), embed_dim, hidden_dim."""
  temperature: float = 0.2
  shared_head: str = ""
  teacher_head: str = "moco"
  embed_dim: int = 128
  hidden_dim: int = 0
  uses_labels = False

  @property
  def needs(self):
    teacher = ("teacher_features", "teacher_objectives") if self.teacher_head else (
        "teacher_logits",)
    return ("features", "objective_params") + teacher

  def _teacher_head(self, teacher_objectives):
    head = teacher_objectives.get(self.teacher_head, {}).get("head")
    if head is None:
      raise ValueError(f"the teacher run has no trained '{self.teacher_head}' head "
                       f"(params/objectives/{self.teacher_head}/head); calibration needs a "
                       "teacher trained with that term (e.g. objectives='moco'), or set "
                       "config.calibration.teacher_head.")
    return head

  def init(self, key, example):
    if self.teacher_head and "teacher_objectives" in example:
      self._teacher_head(example["teacher_objectives"])  # Fails before the first step.
    if self.shared_head:
      return {}, {}
    features = example["features"]
    hidden = self.hidden_dim or int(features.shape[-1])
    return {"head": MLPHead(hidden, self.embed_dim).init(key, features)["params"]}, {}

  def loss(self, params, state, batch, *, aux, axis_name):
    del batch
    head = aux["objective_params"][self.shared_head]["head"] if self.shared_head else params["head"]
    s = embed(head, aux["features"], hidden=head["fc1"]["kernel"].shape[1],
              dim=self.embed_dim)
    if self.teacher_head:
      t_head = self._teacher_head(aux["teacher_objectives"])
      t = embed(t_head, aux["teacher_features"], hidden=t_head["fc1"]["kernel"].shape[1],
                dim=t_head["fc2"]["kernel"].shape[1])
    else:  # The teacher's output is its embedding (a converted MoCo v2 model).
      t = losses.l2_normalize(aux["teacher_logits"].astype(jnp.float32))
    return calibration_loss(s, t, temperature=self.temperature, axis_name=axis_name), state, {}

  def describe(self) -> str:
    own = f"the '{self.shared_head}' head" if self.shared_head else "its own MLP head"
    teacher = (f"its run's '{self.teacher_head}' head" if self.teacher_head
               else "its normalised output")
    return (f"CE(softmax(teacher/{self.temperature}), log_softmax(student/{self.temperature})) "
            f"of unit {self.embed_dim}-d embeddings; student: {own}; teacher: {teacher}")


@register("calibration")
def _build(context):
  c = context.config.calibration
  if not c.temperature > 0:
    raise ValueError(f"config.calibration.temperature={c.temperature!r} must be > 0.")
  names = [name for name, weight in base.resolve_weights(context.config) if weight > 0]
  teacher_head = str(c.teacher_head)
  if teacher_head == "auto":
    teacher_head = "moco"
    if context.config.teacher:  # The teacher run's own terms say where its embedding is.
      from cmim_jax import teachers  # pylint: disable=g-import-not-at-top
      run_config, _ = teachers.load_run(context.config.teacher, "teacher")
      trained = [n for n, w in base.resolve_weights(run_config) if w > 0]
      teacher_head = "moco" if "moco" in trained else ""
  return Calibration(temperature=float(c.temperature),
                     shared_head="moco" if "moco" in names else "",
                     teacher_head=teacher_head,
                     embed_dim=int(context.config.moco.embed_dim),
                     hidden_dim=int(context.config.moco.hidden_dim))
