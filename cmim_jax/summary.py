"""Model summary in the manner of ``larq.models.summary``.

Per layer (every module owning parameters directly): parameter count, bits per
kernel weight (1 for a binarized kernel, 32 otherwise), binary and real
multiply-accumulates per example, and memory as float32 and as deployed with
1-bit kernels packed 8 to a byte. BatchNorm running statistics count as 32-bit
non-trainable parameters.

Which layers are binary is read from what they do, not from their class, so a
user's own layers and quantizers count: a layer's ``kernel`` is 1-bit when the
layer has a ``kernel_quantizer`` field that is not ``'identity'``; its inputs
are binary when it sows into ``'binary_acts'`` (the CMIM taps, see
``docs/CONTRACTS.md``) or has an ``input_quantizer`` field that is not
``'identity'``. A MAC is binary when both its input and its kernel are.

Shapes come from ``jax.eval_shape`` of ``model.init`` with a method interceptor
recording each module's output shape: nothing is computed or allocated.

Example::

  from cmim_jax import models, summary
  summary.print_summary(models.get_model('resnet18'),
                        jnp.zeros((1, 32, 32, 3)), train=False)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax

from cmim_jax import layers, quantizers

FLOAT_BITS = 32


@dataclasses.dataclass(frozen=True)
class LayerSummary:
  """One row of the summary.

  Attributes:
    path: '/'-joined module path.
    kind: module class name.
    output_shape: output shape for the given input (batch included).
    params: trainable parameters.
    batch_stats: non-trainable parameters (BatchNorm running statistics).
    kernel_bits: bits per kernel weight (1 or 32), None without a kernel.
    binary_params: parameters stored with 1 bit.
    binary_macs: binary multiply-accumulates per example.
    real_macs: real-valued multiply-accumulates per example.
    memory_f32: bytes with every parameter in float32.
    memory_packed: bytes with 1-bit parameters packed (8 per byte).
  """
  path: str
  kind: str
  output_shape: tuple[int, ...]
  params: int
  batch_stats: int
  kernel_bits: int | None
  binary_params: int
  binary_macs: int
  real_macs: int
  memory_f32: int
  memory_packed: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
  """All rows and their totals."""
  layers: tuple[LayerSummary, ...]

  def total(self, field: str) -> int:
    return sum(getattr(row, field) for row in self.layers)

  @property
  def memory_saving(self) -> float:
    """How many times smaller the packed model is than the float32 one."""
    return self.total("memory_f32") / max(self.total("memory_packed"), 1)


def _subtree(tree: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any]:
  for name in path:
    if not isinstance(tree, Mapping) or name not in tree:
      return {}
    tree = tree[name]
  return tree if isinstance(tree, Mapping) else {}


def _own_leaves(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Parameters held by the module itself (not by its submodules)."""
  return {k: v for k, v in tree.items() if not isinstance(v, Mapping)}


def _quantizes(module: nn.Module, field: str) -> bool:
  """Whether ``module.<field>`` is a quantizer other than ``'identity'``."""
  q = getattr(module, field, None)
  return q is not None and not quantizers.is_identity(q)


def _record_calls(model: nn.Module, x: Any, call_kwargs: Mapping[str, Any]):
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    # Reserve the row before running the call: rows follow call order, a
    # layer before the submodules it calls (e.g. its input shift).
    index = len(calls)
    calls.append(None)
    out = next_fun(*args, **kwargs)
    calls[index] = (tuple(context.module.path), context.module,
                    tuple(getattr(out, "shape", ())))
    return out

  def init(inputs):
    with nn.intercept_methods(interceptor):
      return model.init(jax.random.key(0), inputs, **call_kwargs)

  variables = jax.eval_shape(init, x)
  return variables, calls


def summarize(model: nn.Module, x: Any, **call_kwargs: Any) -> ModelSummary:
  """The summary of ``model`` applied to inputs shaped like ``x``.

  Args:
    model: an unbound Flax module.
    x: an input array or ``jax.ShapeDtypeStruct`` (the batch axis first; MACs
      are reported per example).
    **call_kwargs: passed to the model's ``__call__`` (e.g. ``train=False``).

  Returns:
    A :class:`ModelSummary`, rows in call order.
  """
  variables, calls = _record_calls(model, x, call_kwargs)
  params, stats = variables.get("params", {}), variables.get("batch_stats", {})
  sown = variables.get(layers.BINARY_ACTS, {})
  rows, seen = [], set()
  for path, module, out_shape in calls:
    own = _own_leaves(_subtree(params, path))
    own_stats = _own_leaves(_subtree(stats, path))
    if path in seen or not (own or own_stats):
      continue
    seen.add(path)
    n_params = sum(math.prod(v.shape) for v in own.values())
    n_stats = sum(math.prod(v.shape) for v in own_stats.values())
    kernel = own.get("kernel")
    kernel_binary = kernel is not None and _quantizes(module, "kernel_quantizer")
    input_binary = bool(_own_leaves(_subtree(sown, path))) or _quantizes(
        module, "input_quantizer")
    kernel_bits = None if kernel is None else (1 if kernel_binary else FLOAT_BITS)
    binary_params = math.prod(kernel.shape) if kernel_binary else 0
    # Per output position a conv does kernel.size MACs; a dense layer has one.
    macs = (math.prod(out_shape[1:-1]) * math.prod(kernel.shape)
            if kernel is not None and kernel.ndim >= 2 else 0)
    real_bits = FLOAT_BITS * (n_params + n_stats - binary_params)
    rows.append(LayerSummary(
        path="/".join(path), kind=type(module).__name__, output_shape=out_shape,
        params=n_params, batch_stats=n_stats, kernel_bits=kernel_bits,
        binary_params=binary_params,
        binary_macs=macs if (kernel_binary and input_binary) else 0,
        real_macs=0 if (kernel_binary and input_binary) else macs,
        memory_f32=FLOAT_BITS * (n_params + n_stats) // 8,
        memory_packed=math.ceil((binary_params + real_bits) / 8)))
  return ModelSummary(tuple(rows))


def _fmt(n: float) -> str:
  return f"{n:,.0f}" if n else "0"


def format_summary(s: ModelSummary) -> str:
  """The summary as a text table with totals."""
  head = ("Layer", "Type", "Output shape", "Params", "BN stats", "Bits",
          "Binary MACs", "Real MACs", "Mem f32 KiB", "Mem packed KiB")
  body = [(r.path, r.kind, str(r.output_shape), _fmt(r.params), _fmt(r.batch_stats),
           "-" if r.kernel_bits is None else str(r.kernel_bits), _fmt(r.binary_macs),
           _fmt(r.real_macs), f"{r.memory_f32 / 1024:.2f}",
           f"{r.memory_packed / 1024:.2f}") for r in s.layers]
  total = ("Total", "", "", _fmt(s.total("params")), _fmt(s.total("batch_stats")), "",
           _fmt(s.total("binary_macs")), _fmt(s.total("real_macs")),
           f"{s.total('memory_f32') / 1024:.2f}", f"{s.total('memory_packed') / 1024:.2f}")
  widths = [max(len(row[i]) for row in [head, total, *body]) for i in range(len(head))]
  line = lambda row: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths)))
  rule = "-" * len(line(head))
  real = s.total("params") + s.total("batch_stats") - s.total("binary_params")
  lines = [line(head), rule, *map(line, body), rule, line(total), rule,
           f"Trainable params: {_fmt(s.total('params'))}   "
           f"non-trainable (BN statistics): {_fmt(s.total('batch_stats'))}",
           f"1-bit params: {_fmt(s.total('binary_params'))}   32-bit params: {_fmt(real)}",
           f"Binary MACs: {_fmt(s.total('binary_macs'))}   "
           f"real MACs: {_fmt(s.total('real_macs'))}  (per example)",
           f"Memory: {s.total('memory_f32') / 2**20:.2f} MiB float32, "
           f"{s.total('memory_packed') / 2**20:.2f} MiB packed "
           f"({s.memory_saving:.2f}x smaller)"]
  return "\n".join(lines)


def print_summary(model: nn.Module, x: Any, print_fn: Callable[[str], Any] = print,
                  **call_kwargs: Any) -> ModelSummary:
  """Prints the summary table of ``model`` on inputs like ``x``; returns the data."""
  s = summarize(model, x, **call_kwargs)
  print_fn(format_summary(s))
  return s
