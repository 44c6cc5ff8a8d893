"""The model registry: names to factories, and models built from a config.

A model is registered under a name with ``@register("name")`` on a Flax
module class or a function returning one, or ``register("name")(partial)``
for a ``functools.partial`` variant. A registered factory must build the
model with no arguments (its defaults); the model must have the fields
``num_classes`` and ``bn_axis_name`` and follow the protocol of
``docs/CONTRACTS.md``.

:func:`from_config` sets any dataclass field of the model from the
``config.model`` section. :func:`config_section` is that section: ``name``
plus one ``ml_collections`` placeholder (typed, ``None``) per field of the
registered models, so command-line overrides are type-checked and an unset
field keeps the model's default.

Config values map to field values as follows: numbers, booleans, strings
and tuples as they are (lists become tuples); ``dtype``-like fields from a
name (``'bfloat16'``); fields holding a module class or factory
(``block_cls``, ``input_shift``) from a part identifier such as
``'BiRealBlock'`` or ``'ASD(reduction=8)'`` (:func:`register_part`), or
``'none'``; quantizer fields from a quantizer identifier
(``'ste_sign(clip=1.5)'``, see :func:`cmim_jax.quantizers.get`).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Iterable, Mapping, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from cmim_jax import quantizers
from cmim_jax.identifiers import add_unique, parse_identifier

# Set by from_config's arguments (the data and the parallel wrapper), not the config.
RESERVED = ("num_classes", "bn_axis_name")
# Fields every Flax module has that are not the model's own.
_FLAX_FIELDS = ("parent", "name")

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_PARTS: dict[str, Any] = {}


def register(name: str) -> Callable[[Any], Any]:
  """Registers a model factory under ``name``; use as a decorator.

  Args:
    name: the name ``config.model.name`` and :func:`get_model` use.

  Returns:
    A decorator that registers its argument (a module class or a function or
    partial returning an unbound module) and returns it unchanged.

  Raises:
    ValueError: ``name`` is already registered.
  """
  if not isinstance(name, str) or not name:
    raise TypeError(f"register takes the model's name, e.g. @register('my_net'); got {name!r}")

  def decorate(factory):
    if not callable(factory):
      raise TypeError(f"model {name!r}: expected a module class or factory, got {factory!r}")
    return add_unique(_MODELS, name, factory, "model")

  return decorate


def register_part(name: str) -> Callable[[Any], Any]:
  """Registers a module class or factory a model field can hold (``block_cls``,
  ``input_shift``) under ``name``, so a config can name it; use as a decorator."""

  def decorate(part):
    return add_unique(_PARTS, name, part, "part")

  return decorate


def names() -> tuple[str, ...]:
  """The registered model names, sorted."""
  return tuple(sorted(_MODELS))


def part_names() -> tuple[str, ...]:
  """The registered part names, sorted."""
  return tuple(sorted(_PARTS))


def _factory(name: str) -> Callable[..., nn.Module]:
  try:
    return _MODELS[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(names())} (a model of "
                     "your own: register it and list its module in config.imports)") from None


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds the model registered as ``name``.

  Args:
    name: one of :func:`names`.
    **kwargs: module fields overriding the variant's (``num_classes``,
      ``input_quantizer``, ``kernel_quantizer``, ``bn_axis_name``, ``dtype``, ...).

  Returns:
    An unbound ``flax.linen.Module``.

  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  return _factory(name)(**kwargs)


def default_model(name: str) -> nn.Module:
  """The model ``name`` with its defaults (no field overridden)."""
  model = _factory(name)()
  if not isinstance(model, nn.Module):
    raise TypeError(f"model {name!r}: its factory returned {type(model).__name__}, "
                    "not a flax.linen.Module")
  return model


def model_fields(name: str) -> dict[str, Any]:
  """The fields of model ``name`` a config can set, with the model's defaults."""
  model = default_model(name)
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.name not in _FLAX_FIELDS + RESERVED}


def _field_annotation(model: nn.Module, field: str) -> str:
  for f in dataclasses.fields(model):
    if f.name == field:
      return f.type if isinstance(f.type, str) else repr(f.type)
  return ""


def _is_dtype(value: Any) -> bool:
  return isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic))


def _kind(field: str, default: Any, annotation: str) -> tuple[str, type]:
  """How a field is written in a config: ``(kind, placeholder type)``."""
  if field.endswith("quantizer"):
    return "quantizer", str
  if _is_dtype(default) or field.endswith("dtype"):
    return "dtype", str
  for t in (bool, int, float, str):  # bool first: it is an int.
    if isinstance(default, t):
      return "value", t
  if isinstance(default, (tuple, list)):
    return "tuple", tuple
  if default is None:
    if any(w in annotation for w in ("Callable", "Module", "Def", "type[")):
      return "part", str
    for word, t in (("bool", bool), ("int", int), ("float", float), ("str", str)):
      if word in annotation and not any(w in annotation for w in ("Sequence", "tuple", "Tuple")):
        return "value", t
    if any(w in annotation for w in ("Sequence", "tuple", "Tuple", "list")):
      return "tuple", tuple
  return "part", str


def config_section(model_names: Iterable[str] | None = None) -> config_dict.ConfigDict:
  """The ``config.model`` section: ``name`` and a ``None`` placeholder per field.

  Args:
    model_names: whose fields to include; default all registered models.

  Returns:
    A ConfigDict with ``name = 'resnet18'`` and, for every field of those
    models except ``num_classes`` and ``bn_axis_name``, a typed placeholder
    (``None`` = the model's default).
  """
  section = config_dict.ConfigDict()
  section.name = "resnet18"
  types: dict[str, type] = {}
  for name in (names() if model_names is None else model_names):
    model = default_model(name)
    for field, default in model_fields(name).items():
      _, t = _kind(field, default, _field_annotation(model, field))
      types.setdefault(field, t)
  for field in sorted(types):
    section[field] = config_dict.placeholder(types[field])
  return section


def _part(field: str, text: str) -> Any:
  if text.strip().lower() == "none":
    return None
  part_name, options = parse_identifier(text, what="part")
  try:
    part = _PARTS[part_name]
  except KeyError:
    raise ValueError(f"config.model.{field}={text!r}: unknown part {part_name!r}; known: "
                     f"{', '.join(part_names())}, none") from None
  return functools.partial(part, **options) if options else part


def _to_tuple(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_to_tuple(v) for v in value)
  return value


def _convert(name: str, field: str, value: Any, default: Any, annotation: str) -> Any:
  kind, t = _kind(field, default, annotation)
  where = f"config.model.{field}={value!r} (model {name!r})"
  if kind == "quantizer":
    if isinstance(value, str):
      quantizers.get(value)  # Fails here, naming the problem, rather than inside a trace.
    return value
  if kind == "dtype":
    try:
      return jnp.dtype(value)
    except TypeError:
      raise ValueError(f"{where}: not a dtype name (e.g. 'float32', 'bfloat16')") from None
  if kind == "part":
    return _part(field, value) if isinstance(value, str) else value
  if kind == "tuple":
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"{where}: expected a tuple like {default!r}")
    return _to_tuple(value)
  if t is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if not isinstance(value, t) or (t is int and isinstance(value, bool)):
    raise ValueError(f"{where}: expected a {t.__name__} like the default {default!r}")
  return value


def from_config(model_config: Union[Mapping[str, Any], config_dict.ConfigDict], *,
                num_classes: int, bn_axis_name: str | None = None) -> nn.Module:
  """Builds the model ``model_config.name`` with the fields the config sets.

  Args:
    model_config: the ``config.model`` section: ``name`` and field values;
      ``None`` (or ``''``) leaves a field at the model's default.
    num_classes: classifier outputs (from the data).
    bn_axis_name: the batch axis for cross-device BatchNorm statistics.

  Returns:
    An unbound ``flax.linen.Module``.

  Raises:
    ValueError: unknown model; a field set that the model does not have (the
      message names the field and the model and lists the model's fields); a
      value of the wrong type, an unknown part or quantizer.
  """
  values = (model_config.to_dict() if isinstance(model_config, config_dict.ConfigDict)
            else dict(model_config))
  name = values.pop("name", None)
  if not name:
    raise ValueError(f"config.model.name is not set; known models: {', '.join(names())}")
  model = default_model(name)
  fields = model_fields(name)
  missing = [f for f in RESERVED if not hasattr(model, f)]
  if missing:
    raise ValueError(f"model {name!r} ({type(model).__name__}) lacks the field(s) {missing} "
                     "every model must have (docs/CONTRACTS.md, Models)")
  kwargs = {}
  for field, value in sorted(values.items()):
    if value is None or (isinstance(value, str) and not value):
      continue
    if field in RESERVED:
      raise ValueError(f"config.model.{field} is set by the trainer (from the data and "
                       "the device mesh), not the config: leave it out")
    if field not in fields:
      raise ValueError(
          f"config.model.{field}={value!r} does not apply to model {name!r} "
          f"({type(model).__name__}), which has no field {field!r}; its fields: "
          f"{', '.join(sorted(fields))}. Leave config.model.{field} unset (None).")
    kwargs[field] = _convert(name, field, value, fields[field],
                             _field_annotation(model, field))
  return _factory(name)(num_classes=num_classes, bn_axis_name=bn_axis_name, **kwargs)


def import_modules(modules: Union[str, Iterable[str]]) -> None:
  """Imports the modules ``config.imports`` names (they register models,
  quantizers, parts) before the config is resolved.

  Args:
    modules: module names, as a sequence or one comma-separated string.

  Raises:
    ImportError: a module cannot be imported (the message says which and
      that it must be importable, e.g. on ``PYTHONPATH``).
  """
  if isinstance(modules, str):
    modules = (modules,)
  for entry in modules:
    for module in (m.strip() for m in entry.split(",")):
      if not module:
        continue
      try:
        importlib.import_module(module)
      except ImportError as e:
        raise ImportError(f"config.imports: cannot import {module!r} ({e}); the module "
                          "must be importable from where you run, e.g. on PYTHONPATH") from e
