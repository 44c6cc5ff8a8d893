"""Identifiers and name tables shared by the registries.

Quantizers (:mod:`cmim_jax.quantizers`), models and model parts
(:mod:`cmim_jax.models.registry`) and objectives
(:mod:`cmim_jax.objectives`) are looked up by a string from the config. This
module holds what they share: the parser of ``'name(key=literal, ...)'``
identifiers and the insert into a name table that refuses a taken name.

Pure Python, no JAX, nothing from ``cmim_jax``: the bottom layer.
"""
from __future__ import annotations

import ast
from typing import Any, MutableMapping, TypeVar

T = TypeVar("T")


def parse_identifier(text: str, what: str = "quantizer") -> tuple[str, dict[str, Any]]:
  """Splits ``'name'`` or ``'name(key=literal, ...)'`` into the name and options.

  Values are Python literals (``ast.literal_eval``): numbers, strings, tuples,
  booleans, None. Only keyword arguments are accepted.

  Args:
    text: the identifier.
    what: what is named, for error messages.

  Returns:
    ``(name, {key: value})``.

  Raises:
    ValueError: not of that form (the message shows the expected form).
  """
  form = f"expected '{what}_name' or '{what}_name(key=value, ...)' with literal values"
  try:
    tree = ast.parse(text.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse {what} {text!r}: {e.msg}; {form}") from None
  if isinstance(tree, ast.Name):
    return tree.id, {}
  if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
    raise ValueError(f"cannot parse {what} {text!r}: {form}")
  if tree.args:
    raise ValueError(f"{what} {text!r}: positional arguments are not accepted, "
                     f"name them; {form}")
  options = {}
  for kw in tree.keywords:
    if kw.arg is None:
      raise ValueError(f"{what} {text!r}: '**' is not accepted; {form}")
    try:
      options[kw.arg] = ast.literal_eval(kw.value)
    except ValueError:
      raise ValueError(f"{what} {text!r}: the value of {kw.arg!r} is not a literal "
                       f"({ast.unparse(kw.value)}); {form}") from None
  return tree.func.id, options


def add_unique(table: MutableMapping[str, T], name: str, value: T, what: str) -> T:
  """``table[name] = value`` unless ``name`` is taken; returns ``value``.

  Args:
    table: a registry's name table.
    name: the name to register.
    value: what it names.
    what: what is named (``'model'``, ``'quantizer'``), for the error message.

  Raises:
    ValueError: ``name`` is already in ``table``.
  """
  if name in table:
    raise ValueError(f"{what} {name!r} is already registered; register yours under "
                     "another name")
  table[name] = value
  return value
