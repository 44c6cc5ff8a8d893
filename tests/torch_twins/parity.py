"""Both sides of the PyTorch parity tests and their comparisons, written once.

Each parity test builds a twin in PyTorch (:func:`randomize` gives it generic
weights), converts its state dict into this library's variables and
compares, in float64, the eval logits, the sown binary activations, the
train-mode logits, the BatchNorm updates and the gradients of
``sum(logits * ct)`` with respect to the parameters and input
(:func:`torch_side` against :func:`flax_side`). Torch is imported inside the
functions: the test modules import this one where torch is absent and skip.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

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
    _assert_model_tree(model, variables, x, key, apply_kwargs)
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


def flax_eval_logits(model, variables, x, *, key=None, **apply_kwargs):
  """Eval-mode logits of ``model`` on converted ``variables``, in float64;
  with ``key``, checks first that the tree is exactly the model's."""
  with jax.enable_x64(True):
    variables = jax.tree.map(jnp.asarray, variables)
    if key is not None:
      _assert_model_tree(model, variables, x, key, apply_kwargs)
    x_j = jnp.asarray(x)
    run = jax.jit(functools.partial(model.apply, train=False, **apply_kwargs))
    return run.lower(variables, x_j).compile(FAST_COMPILE)(variables, x_j)


def _assert_model_tree(model, variables, x, key, apply_kwargs):
  init_shapes = jax.eval_shape(lambda x: model.init(key, x, train=False, **apply_kwargs),
                               jax.ShapeDtypeStruct(x.shape, jnp.float64))
  for col in ("params", "batch_stats"):
    assert (jax.tree.map(lambda a: a.shape, variables[col])
            == jax.tree.map(lambda a: a.shape, init_shapes[col])), col


def flat(tree) -> dict:
  """``{'a/b/c': leaf}`` of a nested dict."""
  return traverse_util.flatten_dict(dict(tree), sep="/")


def nchw(x: np.ndarray):
  """A torch tensor of NHWC ``x`` in the twins' NCHW layout."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
  """A twin's NCHW tensor as NHWC numpy."""
  return t.detach().numpy().transpose(0, 2, 3, 1)


# ---------------------------------------------------------------------------
# The PyTorch side.


class Draws:
  """Random tensors from one seeded torch generator, in call order."""

  def __init__(self, seed: int):
    import torch  # pylint: disable=g-import-not-at-top
    self._torch = torch
    self._g = torch.Generator().manual_seed(seed)

  def normal(self, shape, std: float):
    return self._torch.randn(tuple(shape), generator=self._g, dtype=self._torch.float64) * std

  def uniform(self, shape, lo: float, hi: float):
    return lo + (hi - lo) * self._torch.rand(tuple(shape), generator=self._g,
                                             dtype=self._torch.float64)

  def fan_in(self, shape):
    """He-scaled normal: std ``sqrt(2 / fan_in)``, fan-in all but the first axis."""
    return self.normal(shape, (2.0 / np.prod(shape[1:])) ** 0.5)


def randomize(twin, seed: int, rule: Callable[[str, Any, Draws], Any]) -> Draws:
  """Gives every parameter and BatchNorm statistic of a float64 ``twin`` a
  generic value (the default init has unit variances, zero shifts...).

  Running means get ``N(0, 0.2)``, running variances ``U(0.5, 2)``, PReLU
  slopes ``U(-0.2, 0.6)`` (some negative); every other tensor gets
  ``rule(name, tensor, draws)``, or, where that is None, a fan-in scaled
  normal. Tensors are drawn in ``named_parameters()``, then
  ``named_buffers()`` order, one draw each.

  Returns:
    The :class:`Draws`, for any further changes the caller makes.
  """
  import torch  # pylint: disable=g-import-not-at-top
  draws = Draws(seed)
  with torch.no_grad():
    for name, t in list(twin.named_parameters()) + list(twin.named_buffers()):
      leaf = name.rsplit(".", 1)[-1]
      module = name.rsplit(".", 2)[-2] if "." in name else ""
      if leaf == "num_batches_tracked":
        continue
      if leaf == "running_mean":
        value = draws.normal(t.shape, 0.2)
      elif leaf == "running_var":
        value = draws.uniform(t.shape, 0.5, 2.0)
      elif module.startswith("prelu") and leaf == "weight":
        value = draws.uniform(t.shape, -0.2, 0.6)
      else:
        value = rule(name, t, draws)
        if value is None:
          value = draws.fan_in(t.shape)
      t.copy_(value)
  return draws


def bn_counts(twin, x) -> dict[str, int]:
  """Values per channel each BatchNorm normalises over (N*H*W), by module name."""
  import torch  # pylint: disable=g-import-not-at-top
  counts, hooks = {}, []
  for name, mod in twin.named_modules():
    if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
      hooks.append(mod.register_forward_pre_hook(
          lambda m, inp, name=name: counts.__setitem__(name, inp[0].numel() // inp[0].shape[1])))
  with torch.no_grad():
    twin.eval()(x)
  for h in hooks:
    h.remove()
  return counts


class TorchRun(NamedTuple):
  """What :func:`torch_side` returns.

  Attributes:
    counts: :func:`bn_counts` of the input.
    eval_logits: the eval-mode logits (numpy).
    train_twin: a copy of the twin after one training-mode forward and
      backward (its gradients and updated BatchNorm statistics); the twin
      itself ran in eval mode only, so what its modules kept is eval-mode.
    train_logits: the training-mode logits (numpy).
    grad_x: the gradient with respect to the input, NHWC (numpy).
  """
  counts: dict
  eval_logits: np.ndarray
  train_twin: Any
  train_logits: np.ndarray
  grad_x: np.ndarray


def torch_side(twin, x: np.ndarray, ct: np.ndarray) -> TorchRun:
  """The twin on NHWC ``x``, eval mode, then a copy in training mode with the
  gradient of ``sum(logits * ct)``, as :func:`flax_side` computes them."""
  import torch  # pylint: disable=g-import-not-at-top
  x_t = nchw(x)
  counts = bn_counts(twin, x_t)
  with torch.no_grad():
    eval_logits = twin.eval()(x_t).numpy()
  train_twin = copy.deepcopy(twin).train()
  x_req = x_t.clone().requires_grad_(True)
  train_logits = train_twin(x_req)
  (train_logits * torch.from_numpy(ct)).sum().backward()
  return TorchRun(counts, eval_logits, train_twin, train_logits.detach().numpy(),
                  nhwc(x_req.grad))


def param_grads(train_twin) -> dict[str, np.ndarray]:
  """Name -> gradient of every parameter that got one."""
  return {n: p.grad.numpy() for n, p in train_twin.named_parameters() if p.grad is not None}


def twin_eval_logits(twin, x: np.ndarray) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return twin.eval()(nchw(x)).numpy()


# ---------------------------------------------------------------------------
# Comparisons.


def assert_logits_close(got, want):
  """Float64 logits (the models return them as float32 of float64 math)."""
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def assert_tree_close(actual, expected, rtol: float, what: str):
  """Same paths, and every leaf close relative to that leaf's largest value."""
  a, e = flat(actual), flat(expected)
  assert sorted(a) == sorted(e), what
  for k in e:
    ref = np.asarray(e[k])
    scale = max(float(np.max(np.abs(ref))), 1e-12)
    np.testing.assert_allclose(np.asarray(a[k]), ref, rtol=rtol, atol=rtol * scale,
                               err_msg=f"{what}: {k}")


def assert_far_from_zero(grads, ratio: float = 1e-4):
  """Every gradient leaf reaches ``ratio`` of the largest, so that comparing
  them tests something."""
  top = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  small = {k: float(np.abs(g).max()) for k, g in flat(grads).items()
           if np.abs(g).max() < ratio * top}
  assert not small, small


def assert_batch_stats_close(new_stats, run: TorchRun, state: dict,
                             convert: Callable[[dict], dict], momentum: float = 0.1):
  """The BatchNorm updates of one training step against the twin's.

  Running means match as they are; running variances differ by a known
  convention, undone here: PyTorch folds in the unbiased batch variance,
  Flax the biased one.

  Args:
    new_stats: the Flax ``batch_stats`` after the step.
    run: the twin's step.
    state: the twin's state dict (numpy) before the step.
    convert: state dict -> Flax variables.
    momentum: PyTorch's BatchNorm momentum.
  """
  new_t = {k: v.numpy() for k, v in run.train_twin.state_dict().items()}
  for k, v in state.items():
    if k.endswith("running_var"):
      n = run.counts[k[:-len(".running_var")]]
      unbiased = (new_t[k] - (1 - momentum) * v) / momentum
      new_t[k] = (1 - momentum) * v + momentum * unbiased * (n - 1) / n
  assert_tree_close(new_stats, convert(new_t)["batch_stats"], 1e-9, "batch_stats")


def compare(twin, state: dict, model, convert: Callable[[dict], dict], *, x_shape,
            num_classes: int, key, with_grads: bool = True, **apply_kwargs):
  """Runs the twin and ``model`` (on ``convert(state)``) on one random input
  and compares what every parity test compares.

  In float64: the eval and train-mode logits, the BatchNorm updates and,
  with ``with_grads``, the gradients of ``sum(logits * ct)`` with respect to
  every parameter (converted to the Flax tree) and the input.

  Args:
    twin: the float64 PyTorch twin holding ``state``.
    state: the twin's state dict (numpy).
    model: the Flax model (float64).
    convert: state dict -> Flax variables (it also maps gradients).
    x_shape: NHWC input shape.
    num_classes: logits per example.
    key: PRNG key for the model's shape check.
    with_grads: compare gradients too.
    **apply_kwargs: more arguments of ``model.apply`` (e.g. ``schedule``).

  Returns:
    ``(torch run, sown binary activations flattened ({'path/a_F': (array,)}),
    Flax parameter gradients or None)``, for the checks particular to a model.
  """
  rng = np.random.default_rng(1)
  x = rng.normal(size=x_shape)
  ct = rng.normal(size=(x_shape[0], num_classes))
  want = torch_side(twin, x, ct)
  logits, sown, grads, (train_logits, new_stats) = flax_side(
      model, convert(state), x, ct, key=key, with_grads=with_grads, **apply_kwargs)
  assert_logits_close(logits, want.eval_logits)
  assert_logits_close(train_logits, want.train_logits)
  if with_grads:
    grads, grad_x = grads
    assert_tree_close(grads, convert(param_grads(want.train_twin))["params"], 1e-5,
                      "param gradients")
    np.testing.assert_allclose(grad_x, want.grad_x, rtol=1e-5,
                               atol=1e-5 * np.abs(grad_x).max())
  assert_batch_stats_close(new_stats, want, state, convert)
  return want, flat(sown.get(layers.BINARY_ACTS, {})), grads
