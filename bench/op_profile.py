"""Time each operation of a compiled JAX program as it runs inside the program.

XLA:CPU runs a compiled program as a sequence of thunks (a fusion, a
convolution, a custom call, ...), and its profiler records each thunk's
start and end. :func:`op_times` runs a jitted function under
``jax.profiler.trace``, reads the trace back (``jax.profiler.ProfileData``)
and returns the median time of every top-level operation over the calls, with the
``op_name`` metadata XLA keeps from the JAX program (the ``jax.named_scope``
/ Flax module path that emitted it). :func:`scope_times` then sums them per
layer. That is the cost of a layer inside a whole forward pass: no
dispatch from Python, inputs produced by the previous layer, the same
compiled program as the end-to-end timing, so the per-layer figures add
up to (most of) the end-to-end one.

The profiler adds a little to every thunk (a clock read and a record at
its start and end), the same for every program; the end-to-end rows of
``bench/inference.py`` are timed without it.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import statistics
import tempfile

import jax

# Names of top-level HLO instructions that are not run as thunks of their own.
_NOT_RUN = ("parameter", "constant", "bitcast", "tuple", "get-tuple-element")


def op_names(jitted, *args) -> dict[str, str]:
  """``{instruction name: op_name metadata}`` for the compiled program's
  top-level (entry computation) operations that run."""
  text = jitted.lower(*args).compile().as_text()
  entry = text[text.index("\nENTRY"):]
  names = {}
  for line in entry.splitlines():
    # "[ROOT ]name = shape op(", the shape a tuple "(f32[..], s32[..])" for
    # multi-output operations (sorts, multi-output fusions, loops).
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = (?:\(.*?\)|\S+) ([a-z][\w-]*)\(", line)
    if m and m.group(2) not in _NOT_RUN:
      op = re.search(r'op_name="([^"]*)"', line)
      names[m.group(1)] = op.group(1) if op else ""
  return names


def op_times(jitted, *args, rounds: int = 20,
             names: dict[str, str] | None = None) -> dict[str, tuple[str, float]]:
  """Seconds per call of each top-level operation of ``jitted(*args)``.

  Args:
    jitted: a ``jax.jit`` function (compiled here if it was not).
    *args: its arguments.
    rounds: calls under the profiler (after two warm-up calls).
    names: :func:`op_names` of the program, if already known (it compiles).

  Returns:
    ``{instruction name: (op_name, median seconds over the calls)}``;
    instructions the trace never saw are absent.

  Raises:
    RuntimeError: the trace has no event for any of the program's
      operations (a JAX whose CPU profiler does not record thunks).
  """
  names = names if names is not None else op_names(jitted, *args)
  for _ in range(2):
    jax.block_until_ready(jitted(*args))
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      for _ in range(rounds):
        jax.block_until_ready(jitted(*args))
    files = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
      raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {log_dir}")
    data = jax.profiler.ProfileData.from_file(files[0])
  runs = collections.defaultdict(list)
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in names:
          runs[event.name].append(event.duration_ns)
  if not runs:
    raise RuntimeError("the profile recorded none of the program's operations; this JAX's CPU "
                       "profiler does not trace XLA thunks")
  # The median over the calls: a call that a shared machine preempted
  # mid-operation does not move it (a mean would take it in).
  return {name: (names[name], statistics.median(ns) * 1e-9) for name, ns in runs.items()}


def scope_times(times: dict[str, tuple[str, float]], scopes) -> dict[str, float]:
  """Seconds per call of the operations under each scope (``a/b`` matches an
  op_name containing ``/a/b/``), and ``"total"``: every operation's."""
  out = {s: sum(t for op, t in times.values() if f"/{s}/" in op) for s in scopes}
  out["total"] = sum(t for _, t in times.values())
  return out
