"""The PyTorch twin used by bench/train_step.py: same parameter count as the JAX
model, and its IR-Net quantizers give exact +-1 activations and +-2^n weights."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import torch_bnn  # noqa: E402  pylint: disable=g-import-not-at-top

from cmim_jax import binarize, models  # noqa: E402


def _jax_num_params(name):
  model = models.get_model(name, num_classes=10)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def test_resnet20_param_count_matches_jax():
  assert torch_bnn.num_params(torch_bnn.get_model("resnet20")) == _jax_num_params("resnet20")


def test_ede_sign_forward_is_exactly_plus_minus_one():
  x = torch.tensor([-2.0, -1e-8, 0.0, 1e-8, 3.0])
  k, t = torch.tensor(1.0), torch.tensor(2.0)
  y = torch_bnn.ede_sign(x, k, t)
  assert torch.equal(y, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))  # sign(0) = +1


def test_ede_sign_gradient_is_ede():
  x = torch.linspace(-2, 2, 9, requires_grad=True)
  k, t = torch.tensor(1.5), torch.tensor(3.0)
  torch_bnn.ede_sign(x, k, t).sum().backward()
  want = 1.5 * 3.0 * (1 - np.tanh(3.0 * x.detach().numpy()) ** 2)
  np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-6)


def test_libra_pb_weights_are_power_of_two_scaled_signs_matching_jax():
  w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
  k, t = torch.tensor(1.0), torch.tensor(1.0)
  wb = torch_bnn.irnet_weight(w, k, t)
  for c in range(w.shape[0]):
    values = torch.unique(wb[c].abs())
    assert values.numel() == 1
    exponent = torch.log2(values[0])
    assert torch.equal(exponent, torch.round(exponent))
  # The same kernel through cmim_jax (HWIO, output channel last) agrees exactly.
  w_jax = jnp.asarray(w.permute(2, 3, 1, 0).numpy())
  want = binarize.irnet_weight(w_jax, 1.0, 1.0)
  np.testing.assert_array_equal(wb.permute(2, 3, 1, 0).numpy(), np.asarray(want))


def test_binary_conv_convolves_signs_with_binary_kernel():
  conv = torch_bnn.BinaryConv2d(3, 4, 3, padding=1)
  x = torch.randn(2, 3, 8, 8)
  x_b = torch_bnn.ede_sign(x, conv.k, conv.t)
  assert set(torch.unique(x_b).tolist()) == {-1.0, 1.0}
  want = torch.nn.functional.conv2d(
      x_b, torch_bnn.irnet_weight(conv.weight, conv.k, conv.t), padding=1)
  torch.testing.assert_close(conv(x), want)
