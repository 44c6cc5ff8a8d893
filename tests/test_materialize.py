"""models.common.materialized: the CPU-only division by a run-time one that
stops XLA recomputing block outputs changes no value and no gradient, and it
does what it is for (fewer HLO instructions in a ResNet-20 training step)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmim_jax import models
from cmim_jax.models import common


@pytest.fixture
def materialize():
  saved = common.MATERIALIZE_ON_CPU
  yield
  common.MATERIALIZE_ON_CPU = saved


def test_materialized_is_the_identity_with_identity_gradient():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 4, 4, 5)).astype(np.float32) * 1e3)
  x = x.at[1, 2, 3, 4].set(1e-37).at[0, 0, 0, 0].set(-0.0)  # tiny normal, signed zero
  y, vjp = jax.vjp(jax.jit(common.materialized), x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  assert np.signbit(np.asarray(y)[0, 0, 0, 0])
  g = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(g))


def _loss_grads_and_hlo(model, variables, x, labels):
  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            schedule={"k": 2.0, "t": 0.5}, mutable=["batch_stats"])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
  f = jax.jit(jax.value_and_grad(loss))  # a new function: traced with the flag as set
  compiled = f.lower(variables["params"]).compile()
  hlo = compiled.as_text()
  return compiled(variables["params"]), len(re.findall(r"\n\s+(?:ROOT )?%\S+ = ", hlo))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the lever is CPU-only")
def test_resnet20_step_is_bit_identical_and_smaller(materialize):
  model = models.get_model("resnet20")
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  labels = jnp.array([0, 3, 5, 9])
  variables = model.init(jax.random.PRNGKey(1), x, train=False)
  variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  common.MATERIALIZE_ON_CPU = False
  plain, plain_ops = _loss_grads_and_hlo(model, variables, x, labels)
  common.MATERIALIZE_ON_CPU = True
  mat, mat_ops = _loss_grads_and_hlo(model, variables, x, labels)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               plain, mat)
  assert float(jnp.abs(plain[1]["stage1_block1"]["conv1"]["kernel"]).max()) > 0
  # The chains are no longer copied into every consumer.
  assert mat_ops < 0.9 * plain_ops, (mat_ops, plain_ops)
