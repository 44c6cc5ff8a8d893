"""The objective protocol, its registry and the config parser.

An objective term is a small frozen object (hashable: it is part of the
static :class:`~cmim_jax.train.Task`) with

* ``needs``: what the step must compute for it besides the logits
  (``'binary_acts'``: the sown activations of the binary layers;
  ``'features'``: the student's penultimate features, the input of its
  classifier ``fc``; ``'teacher_logits'``, ``'teacher_features'``: the same
  from a frozen teacher on the same images; ``'teacher_objectives'``: the
  teacher run's trained term parameters by name, e.g. its ``moco`` head;
  ``'second_view'``: a second augmented view of the same images,
  ``f32[b, H, W, C]``; ``'student'``: a :class:`Student`, the student's
  parameters before this step and its forward pass, for a term that runs
  the network again, e.g. a momentum encoder; ``'objective_params'``: every
  term's trainable parameters by name, so that terms can share a head);
* ``uses_labels``: whether the term reads ``aux['labels']``. When no term
  of a run does, the run is label-free: the step never reads
  ``batch['label']`` and reports no accuracy;
* ``init(key, example) -> (params, state)``: its trainable parameters
  (projection heads) and its non-trainable state (memory banks), from an
  ``example`` aux dict of batch size 1;
* ``loss(params, state, batch, *, aux, axis_name) -> (loss, new_state,
  metrics)``: pure, per device, against the named axis like the step. The
  step sums ``weight * loss`` over the terms, ``pmean``-s the gradients and
  the metrics, and stores ``new_state`` as is: a term whose state changes
  must make the change identical on every device (e.g. from an
  ``all_gather`` of the global batch).

``aux`` holds ``'logits'`` (f32[b, K], the student's, differentiable),
``'labels'`` (i32[b], unless the run is label-free) and what the terms need. Terms are registered by name
(:func:`register`) and built from the config (:func:`from_config`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, ClassVar, Mapping, NamedTuple

import jax

from cmim_jax.identifiers import add_unique

AUX_NEEDS = ("binary_acts", "features", "teacher_logits", "teacher_features",
             "teacher_objectives", "second_view", "student", "objective_params")
TEACHER_NEEDS = ("teacher_logits", "teacher_features", "teacher_objectives")


class Student(NamedTuple):
  """The student as a term may run it again (``aux['student']``).

  Attributes:
    params: the model's parameters before this step, without gradient (the
      source of a momentum encoder's moving average).
    batch_stats: its BatchNorm statistics before this step.
    apply: ``(params, batch_stats, images) -> (logits, features,
      new_batch_stats)``: the model in training mode with this step's EDE
      schedule and cross-device BatchNorm (statistics of the global batch);
      ``features`` is the input of the classifier ``fc``.
  """
  params: Any
  batch_stats: Any
  apply: Callable[..., Any]


class Objective:
  """Base class of the terms (subclasses are frozen dataclasses)."""
  needs: ClassVar[tuple[str, ...]] = ()
  uses_labels: ClassVar[bool] = True

  def init(self, key: jax.Array, example: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(params, state)``; the default has neither."""
    del key, example
    return {}, {}

  def loss(self, params: Any, state: Any, batch: Mapping[str, jax.Array], *,
           aux: Mapping[str, Any], axis_name: str | None
           ) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
    raise NotImplementedError

  def describe(self) -> str:
    """One line for the training log."""
    return ""


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What a term's factory may read.

  Attributes:
    config: the whole run config (a term reads its own section, ``config[name]``).
    model: the student (with ``bn_axis_name`` set).
    info: the dataset's ``DatasetInfo``.
    has_teacher: whether ``config.teacher`` names a teacher run.
  """
  config: Any
  model: Any
  info: Any
  has_teacher: bool


class Term(NamedTuple):
  """One entry of the objective: registered name, weight, the built term."""
  name: str
  weight: float
  objective: Objective


_FACTORIES: dict[str, Callable[[BuildContext], Objective]] = {}


def register(name: str):
  """Decorator registering ``factory(context) -> Objective`` under ``name``.

  Raises:
    ValueError: ``name`` is not a lowercase identifier or is taken.
  """
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"objective name {name!r} must be a lowercase identifier.")

  def decorator(factory):
    return add_unique(_FACTORIES, name, factory, "objective")
  return decorator


def names() -> list[str]:
  """The registered objective names, sorted."""
  return sorted(_FACTORIES)


def parse_spec(spec: str) -> list[tuple[str, float | None]]:
  """``'ce,cmim:3.2'`` -> ``[('ce', None), ('cmim', 3.2)]``.

  Raises:
    ValueError: an empty entry, a bad weight or a repeated name.
  """
  out, seen = [], set()
  for entry in str(spec).split(","):
    entry = entry.strip()
    if not entry:
      raise ValueError(f"config.objectives={spec!r} has an empty entry; write e.g. 'ce,cmim:3.2'.")
    name, _, weight = entry.partition(":")
    name = name.strip()
    if name in seen:
      raise ValueError(f"config.objectives={spec!r} names {name!r} twice.")
    seen.add(name)
    if weight:
      try:
        value = float(weight)
      except ValueError:
        raise ValueError(f"config.objectives={spec!r}: weight {weight!r} of {name!r} is not a "
                         "number; write 'name:weight', e.g. 'kd:1.0'.") from None
      if value < 0:
        raise ValueError(f"config.objectives={spec!r}: weight of {name!r} must be >= 0.")
      out.append((name, value))
    else:
      out.append((name, None))
  return out


def resolve_weights(config) -> list[tuple[str, float]]:
  """``(name, weight)`` of every term in ``config.objectives``, zero weights kept.

  A term without an explicit weight takes ``config[name].weight`` when its
  section has one (so ``cmim.weight`` keeps working), else 1.
  """
  out = []
  for name, weight in parse_spec(config.objectives):
    if name not in _FACTORIES:
      raise ValueError(f"config.objectives names {name!r}, which is not a registered objective; "
                       f"known: {', '.join(names())} (register your own with "
                       "cmim_jax.objectives.register and config.imports).")
    if weight is None:
      section = config.get(name) if hasattr(config, "get") else None
      weight = float(section.weight) if section is not None and "weight" in section else 1.0
    if weight < 0:
      raise ValueError(f"config.{name}.weight={weight} must be >= 0.")
    out.append((name, float(weight)))
  return out


def from_config(context: BuildContext) -> tuple[Term, ...]:
  """The run's terms, in config order; weight-0 terms are left out entirely.

  Raises:
    ValueError: unknown name, bad weight, nothing left to train, or a term
      that needs a teacher while ``config.teacher`` is empty.
  """
  terms = []
  for name, weight in resolve_weights(context.config):
    if weight == 0.0:
      continue  # Off exactly: no params, no state, no compute.
    objective = _FACTORIES[name](context)
    if not set(objective.needs) <= set(AUX_NEEDS):
      raise ValueError(f"objective {name!r} needs {objective.needs}; the step provides "
                       f"{AUX_NEEDS}.")
    if set(TEACHER_NEEDS) & set(objective.needs) and not context.has_teacher:
      raise ValueError(f"objective {name!r} distils from a teacher, but config.teacher is empty; "
                       "set --config.teacher=WORKDIR_OF_A_TRAINED_RUN.")
    terms.append(Term(name, weight, objective))
  if not terms:
    raise ValueError(f"config.objectives={context.config.objectives!r} leaves no term with a "
                     "weight > 0; nothing would be trained.")
  return tuple(terms)


def term_key(rng: jax.Array, name: str) -> jax.Array:
  """A term's init key: depends on its name only, not on the other terms."""
  import zlib
  return jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)
