"""Training and evaluation: the per-device steps, written once, and their state.

The steps are ``train_step(state, batch, *, task) -> (state, metrics)`` and
``eval_step(state, batch, *, task) -> sums``: everything that changes from step
to step (the IR-Net EDE ``(k, t)``, the learning rate, the augmentation key)
is derived from ``state.step`` inside them, and everything static lives in the
:class:`Task`. They take the named axis ``'data'`` (:data:`parallel.AXIS`) and
use its collectives: gradients, metrics and BatchNorm statistics are
``pmean``-ed, BatchNorm normalises with global-batch statistics
(``bn_axis_name``) and the objective terms (:mod:`cmim_jax.objectives`) reduce
over it as they need (the CMIM InfoNCE gathers its negatives from every
device). The step sums the terms of ``task.objectives`` and never names one.
:func:`make_steps` wraps both for a :class:`~cmim_jax.parallel.Parallel`
(``jax.shard_map`` + ``jit`` by default, or ``jax.pmap``)::

  task = build_task(config, info, total_steps=..., steps_per_epoch=...)
  steps = make_steps(task, par)
  state, metrics = steps.train(state, par.batch_input(batch))

Everything that touches files (checkpoints, metrics) lives in the run driver,
:mod:`cmim_jax.loop` (:func:`~cmim_jax.loop.train_and_evaluate`,
:func:`~cmim_jax.loop.evaluate_checkpoint`, re-exported here); the steps are pure.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from cmim_jax import binarize
from cmim_jax import input_pipeline
from cmim_jax import losses
from cmim_jax import models
from cmim_jax import objectives as objectives_lib
from cmim_jax import optim
from cmim_jax import step_aux
from cmim_jax import teachers
from cmim_jax import variables as variables_lib
from cmim_jax.parallel import AXIS, Parallel

# Re-exported: the config checks and the run config file are part of this API.
from cmim_jax.run_config import CONFIG_FILE, load_run_config, save_run_config, validate_config  # noqa: F401


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs; a pytree of arrays.

  ``params`` is ``{'model': ..., 'objectives': {term: ...}}``: the BNN and the
  trainable parameters of each objective term (projection heads; ``{}`` for
  terms without), trained by one optimizer. ``objectives`` is each term's
  non-trainable state (memory banks) by name; ``teacher`` the frozen
  teacher's ``{'params', 'batch_stats'}`` (``{}`` without a teacher).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  objectives: Any = dataclasses.field(default_factory=dict)
  teacher: Any = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Task:
  """The static parts of a step: modules, optimizer and hyper-parameters.

  Attributes:
    model: the BNN (built with ``bn_axis_name=axis_name``).
    objectives: the loss terms, ``objectives.Term(name, weight, objective)``.
    tx: the optimizer.
    learning_rate: its schedule, step -> learning rate (logged).
    info: the dataset's ``DatasetInfo``.
    augment: resolved augmentation mode ('device', 'host' or 'none').
    teacher: the frozen teacher's model (eval mode), or None.
    views: MoCo v2 view settings (``config.views``), or None for the dataset's augmentation.
    steps_per_epoch: optimizer steps per epoch (the EDE moves once an epoch).
    total_steps: length of the run in steps.
    ede_t_min: EDE ``t`` at the start.
    ede_t_max: EDE ``t`` at the end.
    axis_name: the device axis the steps reduce over.
  """
  model: nn.Module
  objectives: tuple[objectives_lib.Term, ...]
  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  info: Any
  augment: str
  steps_per_epoch: int
  total_steps: int
  ede_t_min: float
  ede_t_max: float
  teacher: nn.Module | None = None
  views: Any = None
  axis_name: str = AXIS

  @property
  def needs(self) -> frozenset[str]:
    """What the step computes for the terms besides the logits."""
    return frozenset(n for term in self.objectives for n in term.objective.needs)

  @property
  def uses_labels(self) -> bool:
    """False for a label-free run: the step never reads ``batch['label']``."""
    return any(term.objective.uses_labels for term in self.objectives)

  def term(self, name: str) -> objectives_lib.Objective:
    """The built term registered as ``name`` (KeyError if the run has none)."""
    for t in self.objectives:
      if t.name == name:
        return t.objective
    raise KeyError(f"this run has no objective {name!r}; it has {[t.name for t in self.objectives]}.")


# --------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------

def build_task(config: ml_collections.ConfigDict, info, *, total_steps: int,
               steps_per_epoch: int) -> Task:
  """Model, objective terms (``config.objectives``), teacher model, optimizer.

  The teacher's model comes from ``config.teacher``'s config.json; its
  weights are loaded by :func:`load_teacher` into the state.
  """
  models.import_modules(config.imports)
  model = models.from_config(config.model, num_classes=info.num_classes, bn_axis_name=AXIS)
  teacher = None
  if config.teacher:
    run_config, _ = teachers.load_run(config.teacher, "teacher")
    teacher = teachers.build_model(run_config, num_classes=info.num_classes,
                                   data_name=config.data.name)
  terms = objectives_lib.from_config(objectives_lib.BuildContext(
      config=config, model=model, info=info, has_teacher=teacher is not None))
  uses_teacher = set(objectives_lib.TEACHER_NEEDS) & set().union(
      *(t.objective.needs for t in terms))
  if teacher is not None and not uses_teacher:
    logging.warning("config.teacher=%r is set but no term of config.objectives=%r uses it; "
                    "add 'kd', 'crd' or 'calibration' to use it.", config.teacher,
                    config.objectives)
  lr = optim.learning_rate_schedule(
      base_lr=config.learning_rate, total_steps=total_steps,
      warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)),
      schedule=config.lr_schedule)
  tx = optim.create_optimizer(
      name=config.optimizer, learning_rate=lr, momentum=config.momentum,
      weight_decay=config.weight_decay, decay_kernels_only=config.decay_kernels_only,
      decay_dense_kernels=config.decay_dense_kernels, decay_mask=_model_only)
  return Task(model=model, objectives=terms, tx=tx, learning_rate=lr, info=info,
              augment=info.augment, teacher=teacher, views=step_aux.view_spec(config, info),
              steps_per_epoch=int(steps_per_epoch), total_steps=int(total_steps),
              ede_t_min=float(config.ede.t_min), ede_t_max=float(config.ede.t_max))


_apply = step_aux.apply_model  # The step's forward with features, kept under its old name.


def _model_only(params):
  # Weight decay is for the network; the objectives' heads are not decayed.
  return {k: jax.tree.map(lambda _: k == "model", v) for k, v in params.items()}


def load_teacher(config: ml_collections.ConfigDict, task: Task) -> dict:
  """The teacher's ``{'params', 'batch_stats'}`` from ``config.teacher``'s latest checkpoint.

  Raises:
    ValueError: the checkpoint does not fit the model its config.json describes.
  """
  if task.teacher is None:
    return {}
  _, path = teachers.load_run(config.teacher, "teacher")
  # The teacher run's trained term parameters (e.g. a moco head) only for a term that reads them.
  variables, step = teachers.restore_variables(
      path, objectives="teacher_objectives" in getattr(task, "needs", ()))
  x = jnp.zeros((1,) + tuple(task.info.image_shape), jnp.float32)
  expected = jax.eval_shape(
      lambda: variables_lib.init_variables(task.teacher, jax.random.PRNGKey(0), x))
  teachers.check_shapes(variables["params"], expected["params"],
                        what=f"config.teacher={config.teacher!r}")
  logging.info("Teacher: %s from %s (step %d), frozen, eval mode.",
               teachers.load_run(config.teacher)[0].model.name, path, step)
  return variables


def init_state(task: Task, rng: jax.Array, teacher: Any = None) -> TrainState:
  """Initial state (call under ``jit`` with replicated ``out_shardings``).

  Args:
    task: the static parts.
    rng: seeds the model, the terms (each from its name) and the step keys.
    teacher: the teacher's variables (:func:`load_teacher`), when it has one.
  """
  model_rng, terms_rng, state_rng = jax.random.split(rng, 3)
  variables = step_aux.init_model(task, model_rng)
  example = step_aux.init_example(task, variables, teacher)
  params, term_states = {"model": variables["params"], "objectives": {}}, {}
  for term in task.objectives:
    key = objectives_lib.term_key(terms_rng, term.name)
    example["objective_params"] = dict(params["objectives"])  # The terms before this one.
    params["objectives"][term.name], term_states[term.name] = term.objective.init(key, example)
  if task.teacher is not None and not teacher:
    raise ValueError("the task has a teacher model but no teacher variables were given; "
                     "pass train.load_teacher(config, task).")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=task.tx.init(params), rng=state_rng,
                    objectives=term_states, teacher=teacher if task.teacher is not None else {})


# --------------------------------------------------------------------------
# Per-device steps
# --------------------------------------------------------------------------

def preprocess(task: Task, rng: jax.Array | None, images: jax.Array, *,
               offset: jax.Array, train: bool) -> jax.Array:
  """uint8 images -> normalised float32, augmented on device when asked.

  Each example's augmentation key is ``fold_in(rng, global_index)``, so the
  augmented batch does not depend on how many devices share it.
  """
  return input_pipeline.preprocess_on_device(
      rng, images, info=task.info, train=train,
      augment=task.augment if train else "none", index_offset=offset)


def ede_schedule(task: Task, step: Any) -> dict[str, jax.Array]:
  """The IR-Net EDE ``{'k', 't'}`` in force at optimizer step ``step``.

  IR-Net moves ``k`` and ``t`` once an epoch: progress is ``epoch / E`` with
  ``E`` the run's epochs (rounded up), so the last epoch ends at ``t_max``.
  Jittable in ``step`` (an int or an int array): the step calls it with
  ``state.step`` and is traced once for the whole run.

  Args:
    task: gives ``steps_per_epoch``, ``total_steps``, ``ede_t_min``, ``ede_t_max``.
    step: the optimizer step (0-based).

  Returns:
    ``{'k': f32[], 't': f32[]}`` (the ``schedule=`` argument of the models).
  """
  num_epochs = max(1, math.ceil(task.total_steps / task.steps_per_epoch))
  epoch = jnp.asarray(step) // task.steps_per_epoch
  progress = jnp.minimum(epoch.astype(jnp.float32) / num_epochs, 1.0)
  k, t = binarize.ede_schedule(progress, t_min=task.ede_t_min, t_max=task.ede_t_max)
  return {"k": k, "t": t}


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, task: Task
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on this device's share of the global batch.

  Args:
    state: the (replicated) train state.
    batch: this device's ``{'image': uint8[b, H, W, C], 'label': i32[b]}``.
    task: the static parts (keyword, bound by :func:`make_steps`).

  Returns:
    The new state and the step's metrics (means over the global batch): loss
    (the weighted sum), accuracy, ``{term}_loss`` for each term and
    ``{term}_loss/{key}`` for what the term reports (CMIM: per layer),
    learning_rate, ede_k, ede_t.
  """
  axis = task.axis_name
  schedule = ede_schedule(task, state.step)
  offset = jax.lax.axis_index(axis) * batch["image"].shape[0]
  rng = jax.random.fold_in(state.rng, state.step)
  needs = task.needs
  views = step_aux.make_views(task, rng, batch["image"], offset=offset,
                              count=2 if "second_view" in needs else 1)
  images = views[0]
  mutable = ["batch_stats"] + ([losses.BINARY_ACTS] if "binary_acts" in needs else [])
  # A label-free run never reads batch['label'] (its value cannot matter).
  labels = batch["label"] if task.uses_labels else None
  given = {} if labels is None else {"labels": labels}
  if task.teacher is not None:  # Frozen, eval mode, outside the gradient.
    given.update(step_aux.teacher_aux(task, state.teacher, images))
  if "second_view" in needs:
    given["second_view"] = views[1]
  if "student" in needs:
    given["student"] = step_aux.student(task.model, state.params["model"], state.batch_stats,
                                        schedule)

  def loss_fn(params):
    (logits, new_vars), features = _apply(
        task.model, {"params": params["model"], "batch_stats": state.batch_stats},
        images, features="features" in needs, train=True, schedule=schedule, mutable=mutable)
    aux = {"logits": logits, **given}
    if features is not None:
      aux["features"] = features
    if "binary_acts" in needs:
      aux["binary_acts"] = new_vars[losses.BINARY_ACTS]
    if "objective_params" in needs:
      aux["objective_params"] = params["objectives"]
    metrics = {} if labels is None else {
        "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))}
    loss, term_states = None, {}
    for term in task.objectives:
      value, term_states[term.name], extra = term.objective.loss(
          params["objectives"][term.name], state.objectives[term.name], batch,
          aux=aux, axis_name=axis)
      loss = term.weight * value if loss is None else loss + term.weight * value
      metrics[f"{term.name}_loss"] = value
      metrics.update({f"{term.name}_loss/{k}": v for k, v in extra.items()})
    return loss, (metrics, new_vars["batch_stats"], term_states)

  (loss, (aux, batch_stats, term_states)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, axis)
  updates, opt_state = task.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = jax.lax.pmean({"loss": loss, **aux}, axis)
  metrics["learning_rate"] = task.learning_rate(state.step)
  metrics["ede_k"], metrics["ede_t"] = schedule["k"], schedule["t"]
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats=jax.lax.pmean(batch_stats, axis),
                            objectives=term_states)
  return new_state, metrics


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, task: Task
              ) -> dict[str, jax.Array]:
  """Sums of loss and correct predictions over the real (unmasked) examples.

  Args:
    state: the (replicated) train state.
    batch: this device's ``{'image', 'label', 'mask'}``; ``mask`` is 0 for the
      padding that fills the last batch.
    task: the static parts (keyword, bound by :func:`make_steps`).

  Returns:
    ``{'loss_sum', 'correct', 'count'}`` summed over the global batch; the
    caller adds them up over batches and divides once, so that the padded
    last batch weighs by its real examples.
  """
  images = preprocess(task, None, batch["image"], offset=0, train=False)
  logits = task.model.apply(
      {"params": state.params["model"], "batch_stats": state.batch_stats},
      images, train=False)
  mask = batch["mask"].astype(jnp.float32)
  count = jnp.sum(mask)
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  sums = {"loss_sum": losses.cross_entropy(logits, batch["label"], mask=mask) * count,
          "correct": jnp.sum(correct * mask), "count": count}
  return jax.lax.psum(sums, task.axis_name)


class Steps(NamedTuple):
  """The steps of a task, wrapped for a :class:`~cmim_jax.parallel.Parallel`.

  Attributes:
    train: ``(state, batch) -> (state, metrics)``; donates ``state`` when
      built with ``donate_state=True``.
    eval: ``(state, batch) -> sums`` (see :func:`eval_step`).
  """
  train: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
  eval: Callable[..., dict[str, jax.Array]]


def make_steps(task: Task, par: Parallel, *, donate_state: bool = True) -> Steps:
  """Wraps :func:`train_step` and :func:`eval_step` for ``par``, once.

  Args:
    task: the static parts of the steps.
    par: the parallel wrapper; the state is replicated, the batch split.
    donate_state: let the train step reuse the input state's buffers (the
      caller must not read the state it passed in afterwards).

  Returns:
    The wrapped steps, taking the state in ``par``'s step layout
    (``par.to_step_layout``) and a batch from ``par.batch_input``.
  """
  train_fn = par.map(functools.partial(train_step, task=task), n_replicated=1,
                     n_batch=1, donate_state=donate_state)
  eval_fn = par.map(functools.partial(eval_step, task=task), n_replicated=1, n_batch=1)
  return Steps(train=train_fn, eval=eval_fn)


# The run driver moved to cmim_jax.loop; these names stay importable from here.
# Looked up lazily (PEP 562): loop imports this module, so an import at the top
# of either file would be circular.
_LOOP_NAMES = ("train_and_evaluate", "evaluate_checkpoint", "workdir_lock")


def __getattr__(name: str):
  if name in _LOOP_NAMES:
    from cmim_jax import loop  # pylint: disable=g-import-not-at-top
    return getattr(loop, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
