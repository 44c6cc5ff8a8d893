"""bench/op_profile.py: per-operation times from the profiler, summed per scope."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import op_profile  # noqa: E402  pylint: disable=wrong-import-position


def test_scopes_get_their_own_operations_and_the_big_one_costs_more():
  def f(x, w):
    with jax.named_scope("big"):
      y = jnp.tanh(x @ w @ w @ w)
    with jax.named_scope("small"):
      z = jnp.sort(x[0])  # a sort: never fused with the matmuls
    return y, z
  x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32))
  jitted = jax.jit(f)
  names = op_profile.op_names(jitted, x, x)
  assert any("/big/" in op for op in names.values())
  assert any("/small/" in op for op in names.values())
  times = op_profile.op_times(jitted, x, x, rounds=5)
  assert set(times) <= set(names) and times
  s = op_profile.scope_times(times, ["big", "small", "absent"])
  assert s["absent"] == 0.0
  # Three 256^3 matmuls against one 256-element sort: the profile must tell them apart.
  assert s["big"] > 10 * s["small"] > 0
  assert s["big"] + s["small"] <= s["total"] + 1e-12


def test_tuple_shaped_and_root_operations_are_found():
  """A multi-output op (an argsort's sort returns values and indices) and the
  program's ROOT instruction are operations too."""
  def f(x):
    with jax.named_scope("order"):
      return jnp.argsort(x)
  x = jnp.asarray(np.random.default_rng(1).normal(size=4096).astype(np.float32))
  text = jax.jit(f).lower(x).compile().as_text()
  names = op_profile.op_names(jax.jit(f), x)
  entry = text[text.index("\nENTRY"):]
  sorts = [l for l in entry.splitlines() if " sort(" in l]
  assert sorts and "(" in sorts[0].split("=")[1].split()[0]  # a tuple-shaped sort
  assert any(op.endswith("sort") or "/order/" in op for op in names.values())
  assert len(names) == sum(1 for l in entry.splitlines()[1:] if " = " in l
                           and not any(f" {k}(" in l for k in op_profile._NOT_RUN))  # pylint: disable=protected-access
