"""The quantizer registry: quantizers looked up by identifier, as larq's ``get``.

A quantizer is one of the pure functions of :mod:`cmim_jax.binarize` (or a
function of your own) with a name, the schedule values it reads (``k``,
``t``) and the parameters a layer must create for it (WSD's ``a``).
:func:`get` turns an identifier (``'ste_sign'``, ``'ste_sign(clip=1.5)'``,
``'swish_sign(beta=10)'``) into a callable ``q(x, **schedule)``;
:func:`register` adds new ones. See ``docs/CONTRACTS.md``.

:mod:`cmim_jax.binarize` re-exports these names (``binarize.get``,
``binarize.register``, ...), so code written against it keeps working.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax

from cmim_jax import binarize
from cmim_jax.identifiers import add_unique, parse_identifier

Array = jax.Array

class ParamSpec(NamedTuple):
  """A parameter a weight quantizer owns and the layer using it creates:
  ``shape(kernel_shape)`` and a ``jax.nn.initializers`` function ``init``."""
  shape: Callable[[Sequence[int]], tuple[int, ...]]
  init: Callable[..., Array]


@dataclasses.dataclass(frozen=True)
class Quantizer:
  """A named quantizer callable as ``q(x, **schedule)``.

  ``schedule`` may hold more keys than the quantizer needs (e.g. ``k`` and
  ``t`` for every layer); the ones in ``schedule_keys`` and ``params`` are
  required and passed on as keyword arguments, the rest are ignored.

  Attributes:
    name: registry name.
    fn: ``fn(x, **needed, **options)``.
    schedule_keys: array hyper-parameters read from the schedule.
    params: ``(name, ParamSpec)`` pairs of parameters a layer must create and
      pass in (e.g. WSD's per-channel ``a``).
    options: ``(name, value)`` pairs of fixed keyword arguments of ``fn``, set
      from an identifier such as ``'ste_sign(clip=1.5)'`` (see :func:`get`).
  """
  name: str
  fn: Callable[..., Array]
  schedule_keys: tuple[str, ...] = ()
  params: tuple[tuple[str, ParamSpec], ...] = ()
  options: tuple[tuple[str, Any], ...] = ()

  def __call__(self, x: Array, **schedule: Any) -> Array:
    needed = self.schedule_keys + tuple(n for n, _ in self.params)
    missing = [n for n in needed if n not in schedule]
    if missing:
      raise ValueError(
          f"quantizer {self.name!r} needs {missing} (schedule keys "
          f"{list(self.schedule_keys)}, layer-owned params "
          f"{[n for n, _ in self.params]}); got {sorted(schedule)}. Pass e.g. "
          f"schedule={{'k': k, 't': t}} from binarize.ede_schedule.")
    return self.fn(x, **{n: schedule[n] for n in needed}, **dict(self.options))

  @property
  def option_defaults(self) -> dict[str, Any]:
    """The keyword options ``fn`` accepts and their defaults.

    Every parameter of ``fn`` after the input that has a default and is neither
    a schedule key nor a layer-owned parameter (``clip`` of ``ste_sign``,
    ``beta`` of ``swish_sign``).
    """
    try:
      sig = inspect.signature(self.fn)
    except (TypeError, ValueError):  # builtins, some C callables
      return {}
    taken = set(self.schedule_keys) | {n for n, _ in self.params}
    return {n: p.default for i, (n, p) in enumerate(sig.parameters.items())
            if i > 0 and n not in taken and p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

  @property
  def identifier(self) -> str:
    """The string :func:`get` turns back into this quantizer."""
    if not self.options:
      return self.name
    return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.options)})"


def _per_out_channel(shape: Sequence[int]) -> tuple[int, ...]:
  return (shape[-1],)


_REGISTRY: dict[str, Quantizer] = {}


def register(quantizer: Union[Quantizer, str, Callable[..., Array]], fn: Any = None, *,
             schedule_keys: Sequence[str] = (),
             params: Sequence[tuple[str, ParamSpec]] = ()) -> Any:
  """Adds a quantizer to the registry; usable as a decorator.

  Three forms::

    register(Quantizer("my_sign", my_sign))       # returns the Quantizer

    @register("my_sign", schedule_keys=("k", "t"))  # returns my_sign unchanged
    def my_sign(x, k, t, scale=1.0): ...

    @register                                    # name = the function's name
    def my_sign(x, scale=1.0): ...

  The function's keyword arguments with defaults (``scale`` above) become
  options settable from an identifier: ``get("my_sign(scale=2.0)")``.

  Raises:
    ValueError: the name is already registered or is not an identifier.
  """
  if isinstance(quantizer, Quantizer):
    if fn is not None or schedule_keys or params:
      raise TypeError("register(Quantizer(...)) takes no other arguments")
    return _add(quantizer)
  if isinstance(quantizer, str):
    name = quantizer

    def decorate(f):
      _add(Quantizer(name, f, tuple(schedule_keys), tuple(params)))
      return f

    return decorate if fn is None else decorate(fn)
  if callable(quantizer):
    _add(Quantizer(quantizer.__name__, quantizer, tuple(schedule_keys), tuple(params)))
    return quantizer
  raise TypeError(f"register expects a Quantizer, a name or a function, got "
                  f"{type(quantizer).__name__}")


def _add(quantizer: Quantizer) -> Quantizer:
  if not quantizer.name.isidentifier():
    raise ValueError(f"quantizer name {quantizer.name!r} must be a Python identifier "
                     "(it is written as name(key=value) in configs)")
  return add_unique(_REGISTRY, quantizer.name, quantizer, "quantizer")


for _q in (
    Quantizer("identity", binarize.identity),
    Quantizer("ste_sign", binarize.ste_sign),
    Quantizer("approx_sign", binarize.approx_sign),
    Quantizer("ede_sign", binarize.ede_sign, schedule_keys=("k", "t")),
    Quantizer("swish_sign", binarize.swish_sign),
    Quantizer("xnor_weight", binarize.xnor_weight),
    Quantizer("irnet_weight", binarize.irnet_weight, schedule_keys=("k", "t")),
    Quantizer("wsd_weight", binarize.wsd_weight, schedule_keys=("k", "t"),
              params=(("a", ParamSpec(_per_out_channel,
                                      jax.nn.initializers.zeros)),)),
):
  register(_q)
del _q

QuantizerLike = Union[str, Callable[..., Array]]


def names() -> list[str]:
  """The registered quantizer names, sorted."""
  return sorted(_REGISTRY)


def _check_option(q: Quantizer, key: str, value: Any, default: Any) -> Any:
  # Numbers written as ints ('clip=1') are meant as floats when the default is.
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if (default is not None and not isinstance(value, type(default))
      and not (isinstance(default, (int, float)) and isinstance(value, (int, float))
               and not isinstance(value, bool))):
    raise ValueError(f"quantizer {q.name!r}: option {key}={value!r} should be a "
                     f"{type(default).__name__} like its default {default!r}")
  return value


@functools.lru_cache(maxsize=None)
def _parse_cached(text: str) -> Quantizer:
  name, options = parse_identifier(text)
  try:
    q = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown quantizer {name!r}; known: {', '.join(names())}") from None
  if not options:
    return q
  accepted = q.option_defaults
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    listed = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
    from_schedule = [k for k in unknown if k in q.schedule_keys]
    note = (f" ({', '.join(from_schedule)} come from the training schedule, not the "
            "identifier)" if from_schedule else "")
    raise ValueError(f"quantizer {name!r} has no option {', '.join(map(repr, unknown))}; "
                     f"it accepts: {listed}{note}")
  options = {k: _check_option(q, k, v, accepted[k]) for k, v in options.items()}
  return dataclasses.replace(q, options=tuple(sorted(options.items())))


def get(name_or_callable: QuantizerLike) -> Callable[..., Array]:
  """Looks up a quantizer ``q(x, **schedule)`` by identifier, as larq's ``get``.

  An identifier is a registered name, optionally with keyword options in
  Python literal syntax: ``'ste_sign'``, ``'ste_sign(clip=1.5)'``,
  ``'swish_sign(beta=10)'``. The options are the quantizer function's
  keyword arguments with defaults (:attr:`Quantizer.option_defaults`).

  Args:
    name_or_callable: an identifier (see :func:`names`) or a callable
      accepting ``(x, **schedule)``, returned unchanged.

  Returns:
    The quantizer.

  Raises:
    ValueError: unknown name (the message lists the known ones), unknown
      option (the message lists the accepted ones and their defaults), or an
      identifier that does not parse.
  """
  if callable(name_or_callable):
    return name_or_callable
  if not isinstance(name_or_callable, str):
    raise TypeError(f"expected a quantizer name or callable, got "
                    f"{type(name_or_callable).__name__}")
  return _parse_cached(name_or_callable)


def is_identity(name_or_callable: QuantizerLike) -> bool:
  """Whether the quantizer is the full-precision ``'identity'``."""
  q = get(name_or_callable)
  return q is binarize.identity or getattr(q, "fn", None) is binarize.identity


def owned_params(name_or_callable: QuantizerLike) -> tuple[tuple[str, ParamSpec], ...]:
  """``(name, ParamSpec)`` pairs a layer must create for this quantizer."""
  return tuple(getattr(get(name_or_callable), "params", ()))
