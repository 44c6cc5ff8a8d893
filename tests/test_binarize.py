"""Tests for cmim_jax.binarize (forward values, surrogate gradients) and its registry
(cmim_jax.quantizers, re-exported by binarize)."""
import functools
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from cmim_jax import binarize

# Inside, outside and exactly on the |x| == 1 boundary, plus 0 (sign(0) = +1).
POINTS = np.array([-3.0, -1.0001, -1.0, -0.9999, -0.5, -1e-3, 0.0, 1e-3, 0.25,
                   0.5, 0.9999, 1.0, 1.0001, 3.0], np.float32)


# ----------------------------------------------------------- numpy references


def np_sign(x):
  return np.where(x >= 0, 1.0, -1.0)


def ref_ste(x, clip=1.0):
  return (np.abs(x) <= clip).astype(np.float64)


def ref_approx(x):
  x = x.astype(np.float64)
  return np.select([(x >= -1) & (x < 0), (x >= 0) & (x <= 1)],
                   [2 + 2 * x, 2 - 2 * x], 0.0)


def ref_ede(x, k, t):
  return k * t * (1 - np.tanh(t * x.astype(np.float64)) ** 2)


def ref_swish(x, beta):
  # Derivative of 2 sigmoid(bx) (1 + bx (1 - sigmoid(bx))) - 1, written out
  # by the product rule (independent of the closed form in the library).
  bx = beta * x.astype(np.float64)
  s = 1 / (1 + np.exp(-bx))
  ds = beta * s * (1 - s)
  return 2 * ds * (1 + bx * (1 - s)) + 2 * s * (beta * (1 - s) - bx * ds)


def grad_of(fn, x):
  return jax.grad(lambda v: jnp.sum(fn(v)))(x)


ACTIVATIONS = {
    "ste_sign": (binarize.ste_sign, ref_ste),
    "ste_sign_clip_half": (functools.partial(binarize.ste_sign, clip=0.5),
                           functools.partial(ref_ste, clip=0.5)),
    "approx_sign": (binarize.approx_sign, ref_approx),
    "ede_sign_t1": (functools.partial(binarize.ede_sign, k=1.0, t=1.0),
                    functools.partial(ref_ede, k=1.0, t=1.0)),
    "ede_sign_t10": (functools.partial(binarize.ede_sign, k=1.0, t=10.0),
                     functools.partial(ref_ede, k=1.0, t=10.0)),
    "ede_sign_k10": (functools.partial(binarize.ede_sign, k=10.0, t=0.1),
                     functools.partial(ref_ede, k=10.0, t=0.1)),
    "swish_sign": (binarize.swish_sign, functools.partial(ref_swish, beta=5.0)),
    "swish_sign_b2": (functools.partial(binarize.swish_sign, beta=2.0),
                      functools.partial(ref_swish, beta=2.0)),
}


class ActivationBinarizerTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(n, n) for n in ACTIVATIONS])
  def test_forward_and_surrogate(self, name):
    fn, ref = ACTIVATIONS[name]
    x = jnp.asarray(POINTS)
    y = self.variant(fn)(x)
    np.testing.assert_array_equal(np.asarray(y), np_sign(POINTS))
    g = self.variant(functools.partial(grad_of, fn))(x)
    np.testing.assert_allclose(np.asarray(g), ref(POINTS), rtol=1e-5, atol=1e-6)

  def test_ste_boundary_is_inclusive(self):
    g = grad_of(functools.partial(binarize.ste_sign, clip=0.5),
                jnp.array([-0.5, 0.5, 0.5001, -0.5001]))
    np.testing.assert_array_equal(np.asarray(g), [1, 1, 0, 0])

  def test_approx_sign_peak_and_edges(self):
    g = grad_of(binarize.approx_sign, jnp.array([0.0, -1.0, 1.0, -0.5]))
    np.testing.assert_array_equal(np.asarray(g), [2.0, 0.0, 0.0, 1.0])

  @parameterized.parameters(*ACTIVATIONS)
  def test_sign_of_zero_is_plus_one(self, name):
    fn, _ = ACTIVATIONS[name]
    zeros = jnp.zeros((3,), jnp.float32)
    np.testing.assert_array_equal(np.asarray(fn(zeros)), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(fn(-zeros)), [1.0, 1.0, 1.0])

  @parameterized.parameters(*ACTIVATIONS)
  def test_bfloat16_kept(self, name):
    fn, ref = ACTIVATIONS[name]
    x = jnp.asarray(POINTS).astype(jnp.bfloat16).reshape(2, 7)
    y = fn(x)
    chex.assert_type(y, jnp.bfloat16)
    chex.assert_shape(y, (2, 7))
    np.testing.assert_array_equal(np.asarray(y, np.float32).ravel(),
                                  np_sign(np.asarray(x, np.float32).ravel()))
    g = grad_of(fn, x)
    chex.assert_type(g, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(g, np.float32).ravel(),
                               ref(np.asarray(x, np.float32).ravel()),
                               rtol=2e-2, atol=2e-2)

  def test_incoming_gradient_is_scaled(self):
    x = jnp.array([0.3, -0.2, 2.0])
    g_in = jnp.array([2.0, -3.0, 5.0])
    _, vjp = jax.vjp(binarize.approx_sign, x)
    np.testing.assert_allclose(np.asarray(vjp(g_in)[0]),
                               np.asarray(g_in) * ref_approx(np.asarray(x)), rtol=1e-6)

  def test_ste_residual_is_a_boolean_mask(self):
    _, res = binarize._ste_fwd(jnp.ones((4, 4)), 1.0)
    chex.assert_type(res, bool)
    _, res = binarize._xnor_fwd(jnp.ones((4, 4)))
    chex.assert_type(res, bool)

  def test_ede_k_t_get_zero_cotangents(self):
    x = jnp.asarray(POINTS)
    gk, gt = jax.grad(lambda k, t: jnp.sum(binarize.ede_sign(x, k, t)),
                      argnums=(0, 1))(jnp.float32(2.0), jnp.float32(3.0))
    chex.assert_trees_all_equal((gk, gt), (jnp.float32(0), jnp.float32(0)))

  def test_ede_does_not_retrace_when_k_t_change(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, k, t):
      return grad_of(lambda v: binarize.ede_sign(v, k, t), x)

    x = jnp.asarray(POINTS)
    for progress in (0.0, 0.3, 0.7, 1.0):
      k, t = binarize.ede_schedule(jnp.float32(progress))
      g = step(x, k, t)
      np.testing.assert_allclose(np.asarray(g), ref_ede(POINTS, float(k), float(t)),
                                 rtol=1e-5, atol=1e-6)


class EdeScheduleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_formula(self):
    p = np.array([0.0, 0.25, 0.5, 1.0], np.float32)
    for t_min, t_max in ((0.1, 10.0), (1e-2, 10.0), (1e-3, 10.0)):
      k, t = self.variant(functools.partial(binarize.ede_schedule, t_min=t_min,
                                            t_max=t_max))(p)
      t_ref = t_min * 10 ** (p * np.log10(t_max / t_min))
      np.testing.assert_allclose(np.asarray(t), t_ref, rtol=1e-5)
      np.testing.assert_allclose(np.asarray(k), np.maximum(1 / t_ref, 1), rtol=1e-5)

  def test_endpoints(self):
    k, t = binarize.ede_schedule(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(np.asarray(t), [0.1, 10.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(k), [10.0, 1.0], rtol=1e-6)


# ---------------------------------------------------------- weight binarizers


def np_standardize(w):
  axes = tuple(range(w.ndim - 1))
  return (w - w.mean(axes, keepdims=True)) / w.std(axes, ddof=1, keepdims=True)


def central_diff(f, w, eps=1e-5):
  """Numerical gradient of scalar f at float64 w."""
  g = np.zeros_like(w)
  for i in np.ndindex(w.shape):
    d = np.zeros_like(w)
    d[i] = eps
    g[i] = (f(w + d) - f(w - d)) / (2 * eps)
  return g


class WeightBinarizerTest(chex.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.conv_w = rng.normal(0.0, 0.8, (3, 3, 2, 4)).astype(np.float32)
    self.dense_w = rng.normal(0.0, 1.5, (6, 3)).astype(np.float32)
    self.cot = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)

  @parameterized.parameters("conv_w", "dense_w")
  def test_xnor_forward_and_grad(self, which):
    w = getattr(self, which)
    axes = tuple(range(w.ndim - 1))
    alpha = np.abs(w).mean(axes, keepdims=True)
    wb = binarize.xnor_weight(jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(wb), alpha * np_sign(w), rtol=1e-6)
    # Gradient: clipped STE, not multiplied by alpha (ReActNet's code).
    g = grad_of(binarize.xnor_weight, jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(g), (np.abs(w) <= 1).astype(np.float32))

  def test_xnor_grad_on_boundary(self):
    w = jnp.array([[1.0, -1.0], [1.5, 0.0]])
    np.testing.assert_array_equal(np.asarray(grad_of(binarize.xnor_weight, w)),
                                  [[1.0, 1.0], [0.0, 1.0]])

  @parameterized.parameters("conv_w", "dense_w")
  def test_irnet_forward(self, which):
    w = getattr(self, which)
    ws = np_standardize(w.astype(np.float64))
    axes = tuple(range(w.ndim - 1))
    scale = 2.0 ** np.round(np.log2(np.abs(ws).mean(axes, keepdims=True)))
    wb = binarize.irnet_weight(jnp.asarray(w), 1.0, 1.0)
    np.testing.assert_array_equal(np.asarray(wb), np_sign(ws) * scale)
    # The scale is a power of two, so |Wb| is one such value per channel.
    per_channel = np.abs(np.asarray(wb)).reshape(-1, w.shape[-1])
    np.testing.assert_array_equal(per_channel, np.broadcast_to(per_channel[:1], per_channel.shape))
    exps = np.log2(per_channel[0])
    np.testing.assert_array_equal(exps, np.round(exps))

  def test_irnet_scale_is_not_one_for_skewed_filters(self):
    # mean|W'| of a filter with one large outlier is far below 1 -> scale 1/2.
    w = np.full((16, 1), 0.1, np.float32)
    w[0] = 10.0
    w[1] = -0.2
    ws = np_standardize(w.astype(np.float64))
    expected = 2.0 ** np.round(np.log2(np.abs(ws).mean()))
    self.assertNotEqual(expected, 1.0)
    wb = binarize.irnet_weight(jnp.asarray(w), 1.0, 1.0)
    np.testing.assert_allclose(np.abs(np.asarray(wb)), expected)

  @parameterized.parameters((1.0, 1.0), (3.0, 0.5), (1.0, 4.0))
  def test_irnet_grad_matches_smooth_composite(self, k, t):
    w = self.conv_w.astype(np.float64)
    cot = self.cot.astype(np.float64)
    axes = tuple(range(w.ndim - 1))
    scale = 2.0 ** np.round(np.log2(np.abs(np_standardize(w)).mean(axes, keepdims=True)))

    def composite(v):  # sign -> k tanh(t .), scale held fixed, float64 numpy
      return np.sum(cot * scale * k * np.tanh(t * np_standardize(v)))

    g_ref = central_diff(composite, w)
    _, vjp = jax.vjp(lambda v: binarize.irnet_weight(v, k, t), jnp.asarray(self.conv_w))
    g = vjp(jnp.asarray(self.cot))[0]
    np.testing.assert_allclose(np.asarray(g), g_ref, rtol=2e-3, atol=2e-4)

  def test_irnet_grad_flows_through_the_mean(self):
    # Standardization is shift invariant, so with the mean in the graph the
    # per-channel gradient of a uniform cotangent sums to zero; detaching the
    # mean would leave sum(k t (1 - tanh^2) * scale / std) > 0. (The std path
    # is covered by the finite-difference test above.)
    g = grad_of(lambda v: binarize.irnet_weight(v, 1.0, 1.0), jnp.asarray(self.conv_w))
    np.testing.assert_allclose(np.asarray(g).sum(axis=(0, 1, 2)), 0.0, atol=1e-5)
    self.assertGreater(np.abs(np.asarray(g)).max(), 1e-2)

  @parameterized.parameters((1.0, 1.0), (2.0, 3.0))
  def test_wsd_forward_and_grads(self, k, t):
    w = self.conv_w.astype(np.float64)
    a = np.array([-1.0, 0.0, 0.5, 2.0])
    cot = self.cot.astype(np.float64)
    mean = w.mean(axis=(0, 1, 2))  # detached: held fixed below
    sig = lambda v: 1 / (1 + np.exp(-v))
    shifted = w + sig(a) * 0.01 * mean
    wb = binarize.wsd_weight(jnp.asarray(self.conv_w), jnp.asarray(a, jnp.float32), k, t)
    np.testing.assert_array_equal(np.asarray(wb), np_sign(shifted))

    def composite(v, av):
      return np.sum(cot * k * np.tanh(t * (v + sig(av) * 0.01 * mean)))

    _, vjp = jax.vjp(lambda v, av: binarize.wsd_weight(v, av, k, t),
                     jnp.asarray(self.conv_w), jnp.asarray(a, jnp.float32))
    gw, ga = vjp(jnp.asarray(self.cot))
    np.testing.assert_allclose(np.asarray(gw), central_diff(lambda v: composite(v, a), w),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ga), central_diff(lambda av: composite(w, av), a),
                               rtol=1e-3, atol=1e-7)
    self.assertGreater(np.abs(np.asarray(ga)).max(), 0.0)

  def test_wsd_shift_can_flip_a_sign(self):
    # mean 1.0 over the channel; a large a shifts a -0.005 weight past zero.
    w = jnp.array([[-0.005], [1.0], [2.005]])
    flip = binarize.wsd_weight(w, jnp.array([10.0]), 1.0, 1.0)
    keep = binarize.wsd_weight(w, jnp.array([-10.0]), 1.0, 1.0)
    np.testing.assert_array_equal(np.asarray(flip)[:, 0], [1, 1, 1])
    np.testing.assert_array_equal(np.asarray(keep)[:, 0], [-1, 1, 1])

  def test_weight_binarizers_do_not_retrace(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def grads(w, a, k, t):
      return (grad_of(lambda v: binarize.irnet_weight(v, k, t), w),
              grad_of(lambda v: binarize.wsd_weight(v, a, k, t), w))

    w = jnp.asarray(self.conv_w)
    outs = [grads(w, jnp.zeros(4), *binarize.ede_schedule(jnp.float32(p)))
            for p in (0.0, 0.5, 1.0)]
    self.assertFalse(np.allclose(np.asarray(outs[0][0]), np.asarray(outs[2][0])))

  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_weight_dtype_and_shape_kept(self, dtype):
    w = jnp.asarray(self.conv_w).astype(dtype)
    for out in (binarize.xnor_weight(w), binarize.irnet_weight(w, 1.0, 1.0),
                binarize.wsd_weight(w, jnp.zeros(4), 1.0, 1.0)):
      chex.assert_type(out, dtype)
      chex.assert_shape(out, w.shape)

  def test_bad_kernels_raise(self):
    with pytest.raises(ValueError, match="ndim"):
      binarize.xnor_weight(jnp.ones((4,)))
    with pytest.raises(ValueError, match="unbiased"):
      binarize.irnet_weight(jnp.ones((1, 4)), 1.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
      binarize.wsd_weight(jnp.ones((3, 4)), jnp.zeros(3), 1.0, 1.0)


# ------------------------------------------------------------------ registry


class RegistryTest(parameterized.TestCase):

  def test_known_names(self):
    self.assertContainsSubset(
        ["identity", "ste_sign", "approx_sign", "ede_sign", "swish_sign",
         "xnor_weight", "irnet_weight", "wsd_weight"], binarize.names())

  def test_unknown_name_lists_known(self):
    with pytest.raises(ValueError, match="unknown quantizer 'sgn'.*approx_sign.*ste_sign"):
      binarize.get("sgn")

  @parameterized.parameters("ede_sign", "irnet_weight", "wsd_weight")
  def test_schedule_required(self, name):
    with pytest.raises(ValueError, match=f"{name}.*'k', 't'"):
      binarize.get(name)(jnp.ones((3, 3)))

  def test_wsd_needs_its_param(self):
    with pytest.raises(ValueError, match="'a'"):
      binarize.get("wsd_weight")(jnp.ones((3, 3)), k=1.0, t=1.0)
    (name, spec), = binarize.owned_params("wsd_weight")
    self.assertEqual(name, "a")
    self.assertEqual(spec.shape((3, 3, 8, 16)), (16,))
    np.testing.assert_array_equal(np.asarray(spec.init(jax.random.key(0), (4,))), 0.0)

  def test_schedule_extra_keys_ignored(self):
    x = jnp.array([-0.5, 0.5])
    sched = {"k": jnp.float32(2.0), "t": jnp.float32(3.0)}
    np.testing.assert_array_equal(np.asarray(binarize.get("ste_sign")(x, **sched)), [-1, 1])
    np.testing.assert_array_equal(np.asarray(binarize.get("identity")(x, **sched)), [-0.5, 0.5])
    g = grad_of(lambda v: binarize.get("ede_sign")(v, **sched), x)
    np.testing.assert_allclose(np.asarray(g), ref_ede(np.asarray(x), 2.0, 3.0), rtol=1e-6)

  def test_callable_returned_unchanged(self):
    fn = lambda x, **_: x * 2
    self.assertIs(binarize.get(fn), fn)
    self.assertTrue(binarize.is_identity("identity"))
    self.assertFalse(binarize.is_identity("ste_sign"))
    self.assertFalse(binarize.is_identity(fn))

  def test_register_rejects_duplicates(self):
    with pytest.raises(ValueError, match="already registered"):
      binarize.register(binarize.Quantizer("ste_sign", binarize.ste_sign))


# ---------------------------------------------------------------- identifiers


class IdentifierTest(parameterized.TestCase):

  @parameterized.parameters(("ste_sign(clip=1.5)", 1.5), ("ste_sign(clip=1)", 1.0),
                            ("ste_sign", 1.0), (" ste_sign ( clip = 0.5 ) ", 0.5))
  def test_ste_clip_reaches_the_gradient(self, identifier, clip):
    g = grad_of(binarize.get(identifier), jnp.asarray(POINTS))
    np.testing.assert_array_equal(np.asarray(g), ref_ste(POINTS, clip))

  def test_ste_mask_at_1_2(self):
    x = jnp.float32(1.2)
    self.assertEqual(float(jax.grad(binarize.get("ste_sign(clip=1.5)"))(x)), 1.0)
    self.assertEqual(float(jax.grad(binarize.get("ste_sign(clip=1.0)"))(x)), 0.0)

  def test_swish_beta_reaches_the_gradient(self):
    g = grad_of(binarize.get("swish_sign(beta=10)"), jnp.asarray(POINTS))
    np.testing.assert_allclose(np.asarray(g), ref_swish(POINTS, 10.0), rtol=1e-5, atol=1e-6)
    self.assertFalse(np.allclose(np.asarray(g), ref_swish(POINTS, 5.0), atol=1e-3))

  def test_identifier_round_trip_and_hashable(self):
    q = binarize.get("swish_sign(beta=10)")
    self.assertEqual(q.identifier, "swish_sign(beta=10.0)")
    self.assertEqual(binarize.get(q.identifier), q)
    self.assertEqual(hash(q), hash(binarize.get("swish_sign(beta=10.0)")))
    self.assertFalse(binarize.is_identity("ste_sign(clip=2)"))

  @parameterized.parameters(
      ("sgn(clip=1)", "unknown quantizer 'sgn'.*ste_sign"),
      ("ste_sign(clp=1.5)", "'ste_sign' has no option 'clp'; it accepts: clip=1.0"),
      ("swish_sign(clip=1.5)", "'swish_sign' has no option 'clip'; it accepts: beta=5.0"),
      ("ede_sign(t=2.0)", "'ede_sign' has no option 't'; it accepts: none.*t come from "
       "the training schedule"),
      ("ste_sign(clip=)", "cannot parse quantizer 'ste_sign\\(clip=\\)'"),
      ("ste_sign(1.5)", "positional arguments are not accepted"),
      ("ste_sign(clip=x)", "'clip' is not a literal"),
      ("ste_sign(clip='wide')", "clip='wide' should be a float"),
      ("ste_sign.clip", "cannot parse quantizer"),
  )
  def test_bad_identifiers(self, identifier, message):
    with pytest.raises(ValueError, match=message):
      binarize.get(identifier)

  def test_register_decorator_with_options_and_schedule(self):
    @binarize.register("scaled_ede_for_test", schedule_keys=("k", "t"))
    def scaled_ede(x, k, t, scale=1.0):
      return scale * binarize.ede_sign(x, k, t)

    @binarize.register
    def plain_sign_for_test(x, gain=2.0):
      return gain * binarize.sign(x)

    try:
      self.assertTrue(callable(scaled_ede))  # the decorator returns the function
      x = jnp.asarray(POINTS)
      q = binarize.get("scaled_ede_for_test(scale=3)")
      np.testing.assert_array_equal(np.asarray(q(x, k=2.0, t=0.5)), 3.0 * np_sign(POINTS))
      np.testing.assert_allclose(np.asarray(grad_of(lambda v: q(v, k=2.0, t=0.5), x)),
                                 3.0 * ref_ede(POINTS, 2.0, 0.5), rtol=1e-6)
      np.testing.assert_array_equal(
          np.asarray(binarize.get("plain_sign_for_test")(x)), 2.0 * np_sign(POINTS))
      with pytest.raises(ValueError, match="accepts: gain=2.0"):
        binarize.get("plain_sign_for_test(scale=1.0)")
      with pytest.raises(ValueError, match="already registered"):
        binarize.register("plain_sign_for_test")(plain_sign_for_test)
      with pytest.raises(ValueError, match="must be a Python identifier"):
        binarize.register("my-sign")(plain_sign_for_test)
    finally:
      for name in ("scaled_ede_for_test", "plain_sign_for_test"):
        binarize._REGISTRY.pop(name, None)  # pylint: disable=protected-access


# ------------------------------------------------------------------- layering


def test_registry_names_reexported_from_binarize():
  from cmim_jax import quantizers  # pylint: disable=g-import-not-at-top
  for name in ("ParamSpec", "Quantizer", "QuantizerLike", "register", "names", "get",
               "is_identity", "owned_params", "parse_identifier", "_REGISTRY"):
    assert getattr(binarize, name) is getattr(quantizers, name), name
    assert name in dir(binarize), name
  with pytest.raises(AttributeError, match="no attribute 'not_a_quantizer_name'"):
    binarize.not_a_quantizer_name  # pylint: disable=pointless-statement


def test_bottom_modules_import_nothing_above():
  # A fresh interpreter: this one has imported everything already.
  code = ("import sys; import cmim_jax.identifiers; "
          "assert 'jax' not in sys.modules, 'identifiers imports jax'; "
          "import cmim_jax.binarize; "
          "mods = sorted(m for m in sys.modules if m.startswith('cmim_jax.')); "
          "assert mods == ['cmim_jax.binarize', 'cmim_jax.identifiers'], mods")
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                 env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])})
