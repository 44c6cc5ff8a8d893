"""The PyTorch twin used by bench/train_step.py (bench/torch_bnn.py).

The twin is the same BNN as the JAX model: with the JAX model's variables
loaded, logits and gradients agree in float64 (bench/twin_parity.py). The
quantizer tests compare against closed forms written here.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch twin needs torch (pip install torch)")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import torch_bnn  # noqa: E402  pylint: disable=g-import-not-at-top
import twin_parity  # noqa: E402  pylint: disable=g-import-not-at-top

from cmim_jax import models  # noqa: E402


def _jax_variables(name):
  """Random values in the JAX model's variable shapes (no init compilation)."""
  model = models.get_model(name, num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))
  variables = twin_parity._random_variables(shapes, np.random.default_rng(0))  # pylint: disable=protected-access
  return jax.tree.map(lambda x: np.asarray(x, np.float32), variables)


def _parity(name, **kwargs):
  with jax.enable_x64(True):
    return twin_parity.check(name, batch_size=4, **kwargs)


def test_resnet20_twin_has_same_logits_and_gradients():
  report = _parity("resnet20")
  assert report["ok"], report["worst"]
  # Every parameter's gradient, the input gradient and the running means compared.
  n_params = len(list(torch_bnn.get_model("resnet20").parameters()))
  assert sum(q.startswith("grad/") for q in report["errors"]) == n_params
  assert report["max_rel"] < 1e-5


def test_parity_check_fails_for_a_wrong_twin():
  # One negated kernel (the JAX side is cached from the test above). Adding a
  # constant would not do: Libra-PB standardises it away.
  report = _parity("resnet20", corrupt="stage2_block1.conv1.weight")
  assert not report["ok"]
  assert report["errors"]["grad_input"]["rel"] > 1e-3 or report["errors"]["logits_train"]["rel"] > 1e-3


def test_vgg_small_twin_has_same_logits_and_gradients():
  report = _parity("vgg_small")
  assert report["ok"], (report["worst"], report["max_rel"])


@pytest.mark.slow
def test_resnet18_twin_has_same_logits_and_gradients():
  report = _parity("resnet18")
  assert report["ok"], (report["worst"], report["max_rel"])


def test_parity_refuses_float32():
  with pytest.raises(RuntimeError, match="jax_enable_x64"):
    twin_parity.jax_reference("resnet20", 2, 0)


@pytest.mark.parametrize("name", ["resnet20", "vgg_small", "resnet18"])
def test_load_flax_variables_copies_every_value_in_torch_layout(name):
  variables = _jax_variables(name)
  twin = torch_bnn.load_flax_variables(torch_bnn.get_model(name), variables)
  state = twin.state_dict()
  params = variables["params"]
  # Spot checks written out by hand: conv HWIO -> OIHW, dense (in, out) -> (out, in).
  first_conv = "stem_conv" if name.startswith("resnet") else "conv0"
  np.testing.assert_array_equal(state[f"{first_conv}.weight"].numpy(),
                                np.transpose(params[first_conv]["kernel"], (3, 2, 0, 1)))
  np.testing.assert_array_equal(state["fc.weight"].numpy(), np.asarray(params["fc"]["kernel"]).T)
  bn = "stem_bn" if name.startswith("resnet") else "bn3"
  np.testing.assert_array_equal(state[f"{bn}.running_var"].numpy(),
                                variables["batch_stats"][bn]["var"])
  # Same number of values on both sides (BN statistics included).
  n_jax = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
  n_torch = sum(v.numel() for k, v in state.items() if "num_batches" not in k)
  assert n_jax == n_torch


def test_load_flax_variables_rejects_other_models():
  variables = _jax_variables("resnet20")
  with pytest.raises(ValueError, match="no torch counterpart|does not fit"):
    torch_bnn.load_flax_variables(torch_bnn.get_model("vgg_small"), variables)
  with pytest.raises(ValueError, match="not set by the Flax variables"):
    torch_bnn.load_flax_variables(torch_bnn.get_model("resnet20"),
                                  {"params": variables["params"]})
  wrong = jax.tree.map(lambda x: x, variables)
  wrong["params"]["fc"]["kernel"] = np.zeros((64, 100))
  with pytest.raises(ValueError, match="fc/kernel.*does not fit"):
    torch_bnn.load_flax_variables(torch_bnn.get_model("resnet20"), wrong)


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


def test_libra_pb_weights_match_numpy_formula():
  w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
  wb = torch_bnn.irnet_weight(w, torch.tensor(1.0), torch.tensor(1.0)).numpy()
  # IR-Net Libra-PB per output filter, in numpy.
  v = w.numpy().reshape(8, -1)
  v = (v - v.mean(1, keepdims=True)) / v.std(1, ddof=1, keepdims=True)
  scale = 2.0 ** np.round(np.log2(np.abs(v).mean(1, keepdims=True)))
  np.testing.assert_array_equal(wb.reshape(8, -1), np.where(v >= 0, 1.0, -1.0) * scale)
