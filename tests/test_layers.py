"""Tests for cmim_jax.layers: binary conv/dense, RSign, RPReLU, ASD."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from cmim_jax import binarize, layers

SCHED = {"k": jnp.float32(1.0), "t": jnp.float32(1.0)}
# XLA:CPU compiles threefry slowly (seconds per shape); rbg keys compile fast.
KEY = jax.random.key(0, impl="rbg")


def normal(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def np_sign(x):
  return np.where(np.asarray(x) >= 0, 1.0, -1.0)


def images(shape=(2, 8, 8, 3), seed=1):
  return normal(shape, seed)


def init(module, *args):
  """``module.init`` without the sown activations (``apply`` would append to them).

  Jitted: on a small CPU one compile is cheaper than op-by-op initialisers.
  """
  variables = jax.jit(module.init)(KEY, *args)
  return {k: v for k, v in variables.items() if k != layers.BINARY_ACTS}


def apply(module, variables, *args, **kwargs):
  """Jitted ``module.apply``."""
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def ref_conv(x, w, strides, padding):
  """Plain convolution of already-quantized inputs, via flax's nn.Conv."""
  conv = nn.Conv(w.shape[-1], w.shape[:2], strides=strides, padding=padding, use_bias=False)
  return apply(conv, {"params": {"kernel": w}}, x)


class BinaryConvTest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters(("ste_sign", "xnor_weight"), ("approx_sign", "irnet_weight"),
                            ("ede_sign", "wsd_weight"), ("swish_sign", "ste_sign"))
  def test_sees_only_pm1_and_matches_reference_conv(self, input_q, kernel_q):
    x = images()
    layer = layers.BinaryConv(5, (3, 3), strides=2, padding=1, input_quantizer=input_q,
                              kernel_quantizer=kernel_q)
    variables = init(layer, x, SCHED)
    y, state = apply(layer, variables, x, SCHED, mutable=["binary_acts"])
    (a_f,), (a_b,) = state["binary_acts"]["a_F"], state["binary_acts"]["a_B"]
    np.testing.assert_array_equal(np.asarray(a_f), np.asarray(x))
    np.testing.assert_array_equal(np.abs(np.asarray(a_b)), 1.0)
    np.testing.assert_array_equal(np.asarray(a_b), np_sign(x))
    w_b = apply(layer, variables, SCHED, method="effective_kernel")
    chex.assert_shape(w_b, (3, 3, 3, 5))
    # PyTorch-style symmetric padding: 8x8 -> 4x4 at stride 2.
    chex.assert_shape(y, (2, 4, 4, 5))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_conv(a_b, w_b, 2, ((1, 1), (1, 1)))),
                               rtol=1e-5, atol=1e-5)

  def test_xnor_effective_kernel_is_pm_alpha_per_channel(self):
    layer = layers.BinaryConv(4, (3, 3), kernel_quantizer="xnor_weight")
    variables = init(layer, images())
    latent = np.asarray(variables["params"]["kernel"])
    w_b = np.asarray(apply(layer, variables, method="effective_kernel"))
    alpha = np.abs(latent).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(w_b, np_sign(latent) * alpha, rtol=1e-6)
    np.testing.assert_allclose(np.abs(w_b).reshape(-1, 4).max(0),
                               np.abs(w_b).reshape(-1, 4).min(0))
    self.assertGreater(np.ptp(alpha), 0.0)  # really one alpha per channel

  def test_ste_and_wsd_effective_kernels_are_pm1(self):
    for kq in ("ste_sign", "wsd_weight"):
      layer = layers.BinaryConv(4, (3, 3), kernel_quantizer=kq)
      variables = init(layer, images(), SCHED)
      w_b = apply(layer, variables, SCHED, method="effective_kernel")
      np.testing.assert_array_equal(np.abs(np.asarray(w_b)), 1.0)

  def test_irnet_effective_kernel_and_gradient_match_the_paper_in_numpy(self):
    layer = layers.BinaryConv(4, (3, 3), kernel_quantizer="irnet_weight")
    kernel = np.random.default_rng(3).normal(0.1, 0.3, (3, 3, 3, 4))
    sched = {"k": jnp.float32(1.7), "t": jnp.float32(0.6)}
    got = apply(layer, {"params": {"kernel": jnp.asarray(kernel, jnp.float32)}}, sched,
                method="effective_kernel")
    # IR-Net (Qin et al. 2020), Libra-PB per output filter c (last axis here):
    # W' = (W - mean_c) / std_c (unbiased), Wb = sign(W') 2^round(log2 mean_c |W'|).
    w = kernel.reshape(-1, 4)
    n = w.shape[0]
    w_std = (w - w.mean(0)) / w.std(0, ddof=1)
    scale = 2.0 ** np.round(np.log2(np.abs(w_std).mean(0)))
    want = np.where(w_std >= 0, 1.0, -1.0) * scale
    np.testing.assert_allclose(np.asarray(got).reshape(-1, 4), want, rtol=1e-6)
    np.testing.assert_array_equal(np.log2(scale), np.round(np.log2(scale)))
    # Gradient of sum(c * Wb): the EDE k t (1 - tanh^2(t W')) times the detached
    # scale, then back through the standardisation by hand:
    # dW_i = (g_i - mean(g)) / std - W'_i sum_j(g_j W'_j) / ((n - 1) std).
    c = np.random.default_rng(4).normal(size=w.shape)
    g = c * scale * 1.7 * 0.6 * (1 - np.tanh(0.6 * w_std) ** 2)
    want_grad = ((g - g.mean(0)) - w_std * (g * w_std).sum(0) / (n - 1)) / w.std(0, ddof=1)
    got_grad = jax.jit(jax.grad(lambda k: jnp.sum(jnp.asarray(c.reshape(kernel.shape), jnp.float32)
                                                  * layers.effective_kernel(
                                                      {"kernel": k}, "irnet_weight", sched))))(
        jnp.asarray(kernel, jnp.float32))
    np.testing.assert_allclose(np.asarray(got_grad).reshape(-1, 4), want_grad,
                               rtol=2e-4, atol=2e-5)

  def test_identity_quantizers_give_a_plain_conv(self):
    x = images()
    layer = layers.BinaryConv(4, (3, 3), padding="SAME", input_quantizer="identity",
                              kernel_quantizer="identity")
    variables = init(layer, x)
    y, state = apply(layer, variables, x, mutable=[layers.BINARY_ACTS])
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_conv(x, variables["params"]["kernel"],
                                                                  1, "SAME")), rtol=1e-5, atol=1e-5)
    self.assertEqual(dict(state), {})  # nothing binarized, nothing to contrast

  def test_missing_schedule_raises(self):
    layer = layers.BinaryConv(4, (3, 3), input_quantizer="ede_sign", kernel_quantizer="ste_sign")
    with pytest.raises(ValueError, match="ede_sign.*'k', 't'"):
      init(layer, images())

  def test_wsd_owns_a_zero_initialised_param_with_gradient(self):
    x = images()
    layer = layers.BinaryConv(6, (3, 3), input_quantizer="ste_sign", kernel_quantizer="wsd_weight")
    params = init(layer, x, SCHED)["params"]
    self.assertEqual(set(params), {"kernel", "a"})
    np.testing.assert_array_equal(np.asarray(params["a"]), np.zeros(6))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x, SCHED) ** 2)))(params)
    self.assertGreater(float(jnp.abs(grads["a"]).max()), 0.0)

  def test_kernel_gradient_is_masked_by_the_ste(self):
    x = images()
    layer = layers.BinaryConv(3, (3, 3), input_quantizer="ste_sign", kernel_quantizer="ste_sign")
    kernel = np.asarray(init(layer, x)["params"]["kernel"]).copy()
    kernel[0, 0, :, :] = 1.5  # outside the clip: no gradient there
    grads = jax.jit(jax.grad(lambda k: jnp.sum(layer.apply({"params": {"kernel": k}}, x) ** 2)))(
        jnp.asarray(kernel))
    np.testing.assert_array_equal(np.asarray(grads)[0, 0], 0.0)
    self.assertGreater(float(jnp.abs(grads[1:]).max()), 0.0)

  def test_schedule_change_does_not_retrace(self):
    x = images()
    layer = layers.BinaryConv(3, (3, 3), input_quantizer="ede_sign", kernel_quantizer="irnet_weight")
    params = init(layer, x, SCHED)["params"]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grad_fn(p, sched):
      return jax.grad(lambda q: jnp.sum(layer.apply({"params": q}, x, sched) ** 2))(p)

    g = [grad_fn(params, dict(zip("kt", binarize.ede_schedule(jnp.float32(p)))))
         for p in (0.0, 0.5, 1.0)]
    self.assertFalse(np.allclose(np.asarray(g[0]["kernel"]), np.asarray(g[2]["kernel"])))

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_compute(self):
    x = images()
    layer = layers.BinaryConv(3, (3, 3), kernel_quantizer="xnor_weight", dtype=jnp.bfloat16)
    variables = init(layer, x)
    chex.assert_type(variables["params"]["kernel"], jnp.float32)
    y, state = self.variant(functools.partial(layer.apply, mutable=["binary_acts"]))(variables, x)
    chex.assert_type(y, jnp.bfloat16)
    chex.assert_type(state["binary_acts"]["a_B"][0], jnp.bfloat16)

  def test_asd_input_shift_is_sown_as_a_f(self):
    x = images(shape=(2, 4, 4, 8))
    layer = layers.BinaryConv(4, (3, 3), input_shift=functools.partial(layers.ASD, reduction=4))
    variables = init(layer, x)
    _, state = apply(layer, variables, x, mutable=["binary_acts"])
    a_f, a_b = state["binary_acts"]["a_F"][0], state["binary_acts"]["a_B"][0]
    shift = np.asarray(a_f - x)
    self.assertTrue(np.all((shift > 0) & (shift < 1)))
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1, :1, :], shift.shape), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(a_b), np_sign(a_f))


class BinaryDenseTest(parameterized.TestCase):

  @parameterized.parameters("ste_sign", "xnor_weight", "irnet_weight", "wsd_weight")
  def test_matches_sign_matmul(self, kernel_q):
    x = normal((4, 7))
    layer = layers.BinaryDense(5, kernel_quantizer=kernel_q)
    variables = init(layer, x, SCHED)
    y, state = apply(layer, variables, x, SCHED, mutable=["binary_acts"])
    np.testing.assert_array_equal(np.asarray(state["binary_acts"]["a_B"][0]), np_sign(x))
    w_b = np.asarray(apply(layer, variables, SCHED, method="effective_kernel"))
    # One magnitude per output column.
    np.testing.assert_allclose(np.abs(w_b), np.broadcast_to(np.abs(w_b[:1]), w_b.shape), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y), np_sign(x) @ w_b, rtol=1e-5, atol=1e-5)


class ActivationModulesTest(parameterized.TestCase):

  def test_rsign(self):
    x = jnp.array([[-0.3, 0.2, 2.0], [0.1, -0.1, -2.0]])
    beta = jnp.array([0.5, -0.5, 0.0])
    y = apply(layers.RSign(), {"params": {"beta": beta}}, x)
    np.testing.assert_array_equal(np.asarray(y), np_sign(x + beta))
    gx, gb = jax.jit(jax.grad(
        lambda v, b: jnp.sum(layers.RSign().apply({"params": {"beta": b}}, v)),
        argnums=(0, 1)))(x, beta)
    z = np.asarray(x + beta)
    ref = np.maximum(0.0, 2 - 2 * np.abs(z))
    np.testing.assert_allclose(np.asarray(gx), ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gb), ref.sum(0), rtol=1e-6)

  def test_rprelu(self):
    x = jnp.array([[-1.0, 0.5, 2.0], [1.0, -0.5, -2.0]])
    p = {"gamma": jnp.array([0.5, 0.0, -1.0]), "zeta": jnp.array([0.1, 0.2, 0.3]),
         "slope": jnp.array([0.25, 0.1, 2.0])}
    y = apply(layers.RPReLU(), {"params": p}, x)
    z = np.asarray(x) - np.asarray(p["gamma"])
    ref = np.where(z >= 0, z, np.asarray(p["slope"]) * z) + np.asarray(p["zeta"])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-6)
    init_params = init(layers.RPReLU(), x)["params"]
    np.testing.assert_array_equal(np.asarray(init_params["slope"]), 0.25)

  @parameterized.parameters((32, 8, 4), (8, 16, 1))
  def test_asd_matches_numpy(self, channels, reduction, hidden):
    x = normal((2, 3, 3, channels))
    asd = layers.ASD(reduction=reduction)
    params = init(asd, x)["params"]
    self.assertEqual(set(params), {"fc1", "fc2"})  # no biases
    self.assertEqual(set(params["fc1"]), {"kernel"})
    chex.assert_shape(params["fc1"]["kernel"], (channels, hidden))
    w1, w2 = np.asarray(params["fc1"]["kernel"]), np.asarray(params["fc2"]["kernel"])
    gap = np.asarray(x).mean(axis=(1, 2))
    shift = 1 / (1 + np.exp(-(np.maximum(gap @ w1, 0) @ w2)))
    np.testing.assert_allclose(np.asarray(apply(asd, {"params": params}, x)),
                               np.asarray(x) + shift[:, None, None, :], rtol=1e-5, atol=1e-6)


class ScaleAfterConvTest(chex.TestCase, parameterized.TestCase):
  """The binary conv convolves +-1 with +-1 and multiplies by the scale after,
  so that training/eval and packed XNOR-popcount inference agree exactly."""

  @staticmethod
  def _np_int_conv(xs, ws):
    """Zero-padded (1, 1) stride-1 integer convolution, int64."""
    b, h, w, _ = xs.shape
    kh, kw, _, o = ws.shape
    xp = np.pad(xs, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, o), np.int64)
    for i in range(kh):
      for j in range(kw):
        out += np.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + w], ws[i, j])
    return out

  def test_forward_is_the_exact_integer_dot_times_alpha(self):
    x = images((2, 6, 6, 64), seed=5)
    layer = layers.BinaryConv(16, (3, 3), padding=1, input_quantizer="approx_sign",
                              kernel_quantizer="xnor_weight")
    variables = init(layer, x)
    y = np.asarray(apply(layer, variables, x))
    latent = np.asarray(variables["params"]["kernel"])
    w_b = np.asarray(apply(layer, variables, method="effective_kernel"))
    alpha = np.abs(w_b).reshape(-1, 16).max(0)
    dot = self._np_int_conv(np_sign(x).astype(np.int64), np_sign(latent).astype(np.int64))
    want = dot.astype(np.float32) * alpha  # one float32 rounding, as packed inference
    np.testing.assert_array_equal(y, want)
    # The property is not automatic: summing +-alpha terms in float32 rounds
    # every partial sum, and differs from the exact value somewhere.
    plain = np.asarray(ref_conv(jnp.asarray(np_sign(x), jnp.float32), w_b, 1, ((1, 1), (1, 1))))
    self.assertFalse(np.array_equal(plain, want))
    np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(("ste_sign", "xnor_weight"), ("ede_sign", "irnet_weight"),
                            ("approx_sign", "wsd_weight"))
  def test_gradients_are_those_of_the_plain_conv_bit_for_bit(self, input_q, kernel_q):
    x = images((2, 6, 6, 8), seed=6)
    layer = layers.BinaryConv(5, (3, 3), strides=2, padding=1, input_quantizer=input_q,
                              kernel_quantizer=kernel_q)
    params = init(layer, x, SCHED)["params"]
    cot = normal((2, 3, 3, 5), seed=7)
    def new(p, x):
      return jnp.sum(cot * layer.apply({"params": p}, x, SCHED))
    def plain(p, x):  # the conv before the change: sign(x) convolved with Wb
      x_b = binarize.get(input_q)(x, **SCHED)
      w_b = layers.effective_kernel(p, kernel_q, SCHED)
      y = jax.lax.conv_general_dilated(x_b, w_b, (2, 2), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return jnp.sum(cot * y)
    got = jax.jit(jax.grad(new, argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(plain, argnums=(0, 1)))(params, x)
    chex.assert_trees_all_equal(got, want)
    self.assertGreater(float(jnp.abs(got[0]["kernel"]).max()), 0.0)
    self.assertGreater(float(jnp.abs(got[1]).max()), 0.0)

  def test_any_kernel_is_the_same_conv_and_zero_channels_stay_finite(self):
    """Kernels that are not +-alpha (more levels, an all-zero channel) still
    give conv(x, w) up to rounding, with no 0/0."""
    rng = np.random.default_rng(8)
    w = rng.normal(size=(3, 3, 4, 3)).astype(np.float32)
    w[..., 1] = 0.0
    w[..., 2] = np.where(w[..., 2] >= 0, 0.25, -0.25)
    unit, scale = jax.jit(layers._unit_and_scale)(jnp.asarray(w))  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.asarray(scale)[1:], [1.0, 0.25])
    np.testing.assert_array_equal(np.asarray(unit)[..., 2], np_sign(w[..., 2]))
    np.testing.assert_allclose(np.asarray(unit * scale), w, rtol=1e-6)
    x = images((1, 5, 5, 4), seed=9)
    y = jax.jit(functools.partial(layers.scale_after_conv, strides=(1, 1),
                                  padding=((1, 1), (1, 1))))(x, jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_conv(x, w, 1, ((1, 1), (1, 1)))),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(y)[..., 1], 0.0)
