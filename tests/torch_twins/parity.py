"""The Flax side of the PyTorch parity tests, written once.

Each parity test builds a twin in PyTorch, converts its state dict into this
library's variables and compares, in float64, the eval logits, the sown
binary activations, the train-mode logits, the BatchNorm updates and the
gradients of ``sum(logits * ct)`` with respect to the parameters and input.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cmim_jax import layers

# Optimising the compiled code costs more time than it saves on these sizes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def flax_side(model, variables, x, ct, *, key, with_grads: bool = True, **apply_kwargs):
  """Runs ``model`` on converted ``variables`` in float64, as the twins run.

  Checks first that the converted tree is exactly the model's (names and
  shapes of ``params`` and ``batch_stats``).

  Returns:
    ``(eval_logits, sown, grads, (train_logits, new_batch_stats))``; ``grads``
    is ``(param_grads, input_grad)`` of ``sum(train_logits * ct)``, or None
    without ``with_grads``.
  """
  with jax.enable_x64(True):
    variables = jax.tree.map(jnp.asarray, variables)
    init_shapes = jax.eval_shape(lambda x: model.init(key, x, train=False, **apply_kwargs),
                                 jax.ShapeDtypeStruct(x.shape, jnp.float64))
    for col in ("params", "batch_stats"):
      assert (jax.tree.map(lambda a: a.shape, variables[col])
              == jax.tree.map(lambda a: a.shape, init_shapes[col])), col
    params, stats = variables["params"], variables["batch_stats"]

    def run(params, x):
      logits, sown = model.apply({"params": params, "batch_stats": stats}, x, train=False,
                                 mutable=[layers.BINARY_ACTS], **apply_kwargs)

      def loss(params, x):
        out, new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"], **apply_kwargs)
        return jnp.sum(out * ct), (out, new["batch_stats"])

      if with_grads:
        grads, aux = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
      else:
        grads, aux = None, loss(params, x)[1]
      return logits, sown, grads, aux

    x_j = jnp.asarray(x)
    return jax.jit(run).lower(params, x_j).compile(FAST_COMPILE)(params, x_j)
