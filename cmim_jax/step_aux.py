"""What the training step prepares for the objective terms besides the logits.

The step (:func:`cmim_jax.train.train_step`) asks the terms what they need
(``Objective.needs``, :data:`cmim_jax.objectives.AUX_NEEDS`) and this module
builds it: the augmented views, the frozen teacher's outputs, the student as
a term may run it again (:class:`~cmim_jax.objectives.Student`), and the
``example`` dict of batch size 1 from which the terms initialise. A new
term that needs one of these needs no change to the step.

Views: ``config.views.augment=''`` keeps the dataset's augmentation
(``data.augment``: CIFAR's pad-crop-flip, ...); ``'moco_v2'`` draws MoCo v2
views on device (:mod:`cmim_jax.data.views`). View 0 is what the student
(and the teacher) see; view 1, drawn only when a term needs
``'second_view'``, comes from ``fold_in(rng, 1)``, so view 0's draws are the
same with or without it.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmim_jax import input_pipeline
from cmim_jax import losses
from cmim_jax import variables as variables_lib
from cmim_jax.data import views as views_lib
from cmim_jax.objectives.base import Student

VIEW_AUGMENTS = ("", "moco_v2")
# MoCo v2 blurs 224-pixel ImageNet crops only; the automatic choice blurs
# images of at least this side.
AUTO_BLUR_MIN_SIDE = 96


def apply_model(model, variables, images, *, features: bool, **kwargs):
  """``model.apply``, plus the input of its classifier ``fc`` when ``features``.

  Returns:
    ``(output, features or None)``; ``output`` is what ``model.apply`` returns.
  """
  if not features:
    return model.apply(variables, images, **kwargs), None
  captured = []

  def intercept(next_fun, args, kwargs, context):
    if (context.method_name == "__call__" and context.module.name == "fc"
        and isinstance(context.module, nn.Dense)):
      captured.append(args[0])
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(intercept):
    out = model.apply(variables, images, **kwargs)
  if not captured:
    raise ValueError(f"{type(model).__name__} has no classifier nn.Dense named 'fc', whose "
                     "input is the penultimate feature a term asked for.")
  return out, captured[-1]


def view_spec(config, info) -> views_lib.ViewSpec | None:
  """The run's MoCo v2 view settings (``config.views``), or None for the dataset's own.

  Raises:
    ValueError: an unknown ``views.augment``, bad values, or data whose host
      pipeline already crops (ImageNet's 'host' augmentation).
  """
  c = config.views
  if c.augment not in VIEW_AUGMENTS:
    raise ValueError(f"config.views.augment={c.augment!r} is not one of {VIEW_AUGMENTS}.")
  if not c.augment:
    return None
  if info.augment == "host":
    raise ValueError("config.views.augment='moco_v2' crops on device from unaugmented images, "
                     "but the host pipeline already augments (data.augment resolves to 'host'); "
                     "set --config.data.augment=none.")
  blur = float(c.blur_prob)
  if blur < 0:  # Automatic: ImageNet-size images only.
    blur = 0.2 if min(info.image_shape[:2]) >= AUTO_BLUR_MIN_SIDE else 0.0
  return views_lib.ViewSpec(crop_scale=tuple(float(v) for v in c.crop_scale),
                            jitter=tuple(float(v) for v in c.jitter),
                            jitter_prob=float(c.jitter_prob), gray_prob=float(c.gray_prob),
                            blur_prob=blur, flip=bool(c.flip))


def make_views(task, rng: jax.Array, images: jax.Array, *, offset, count: int
               ) -> list[jax.Array]:
  """``count`` normalised training views of this device's uint8 images."""
  out = []
  for v in range(count):
    key = rng if v == 0 else jax.random.fold_in(rng, v)
    if task.views is None:
      out.append(input_pipeline.preprocess_on_device(
          key, images, info=task.info, train=True, augment=task.augment, index_offset=offset))
    else:
      out.append(views_lib.moco_views(key, images, spec=task.views, mean=task.info.mean,
                                      std=task.info.std, index_offset=offset))
  return out


def _student_apply(model, schedule, params, batch_stats, images):
  (logits, new_vars), features = apply_model(
      model, {"params": params, "batch_stats": batch_stats}, images, features=True,
      train=True, mutable=["batch_stats"], **({} if schedule is None else {"schedule": schedule}))
  return logits, features, new_vars["batch_stats"]


def student(model, params, batch_stats, schedule) -> Student:
  """``aux['student']``: the parameters before the step, no gradient, and the forward pass."""
  return Student(params=jax.lax.stop_gradient(params),
                 batch_stats=jax.lax.stop_gradient(batch_stats),
                 apply=functools.partial(_student_apply, model, schedule))


def teacher_aux(task, teacher: Any, images: jax.Array) -> dict[str, Any]:
  """The frozen teacher's outputs the terms need, in eval mode, without gradient."""
  needs, out = task.needs, {}
  if {"teacher_logits", "teacher_features"} & needs:
    logits, features = jax.lax.stop_gradient(apply_model(
        task.teacher, {"params": teacher["params"], "batch_stats": teacher["batch_stats"]},
        images, features="teacher_features" in needs, train=False))
    out["teacher_logits"] = logits
    if features is not None:
      out["teacher_features"] = features
  if "teacher_objectives" in needs:
    out["teacher_objectives"] = jax.lax.stop_gradient(teacher["objectives"])
  return out


def init_example(task, variables, teacher: Any) -> dict[str, Any]:
  """The ``example`` aux dict (batch 1) from which the terms initialise.

  Args:
    task: the static parts of the step.
    variables: the student's initial ``{'params', 'batch_stats'}``.
    teacher: the teacher's variables, or a falsy value without a teacher.
  """
  model = task.model.clone(bn_axis_name=None)
  x = jnp.zeros((1,) + tuple(task.info.image_shape), jnp.float32)
  mutable = [losses.BINARY_ACTS] if "binary_acts" in task.needs else []
  (logits, sown), features = apply_model(model, variables, x, features="features" in task.needs,
                                         train=False, mutable=mutable)
  example = {"logits": logits, "binary_acts": sown.get(losses.BINARY_ACTS, {}),
             "features": features, "teacher_logits": jnp.zeros_like(logits),
             "second_view": x, "objective_params": {},
             "student": student(model, variables["params"], variables.get("batch_stats", {}),
                                None)}
  if task.uses_labels:
    example["labels"] = jnp.zeros((1,), jnp.int32)
  if task.teacher is not None and teacher:
    example.update(teacher_aux(task, teacher, x))
  return example


def init_model(task, rng: jax.Array) -> dict[str, Any]:
  """The student's initial variables (no cross-device BatchNorm outside the step)."""
  x = jnp.zeros((1,) + tuple(task.info.image_shape), jnp.float32)
  return variables_lib.init_variables(task.model.clone(bn_axis_name=None), rng, x)
