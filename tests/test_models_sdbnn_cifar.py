"""SD-BNN's CIFAR-10 networks against a PyTorch twin of the official code.

``resnet20_sdbnn``, ``resnet18_sdbnn`` and ``vgg_small_sdbnn`` against
tests/torch_twins/sdbnn_cifar_torch.py (written from pingxue-hfut/SD-BNN
``cifar10/``), given the same random weights through
``sdbnn_convert.from_official_state_dict``: float64 logits in eval and train
mode, the shifted inputs of every binary conv and their signs, gradients of
every parameter and of the input at a fixed EDE ``(k, t)``, and the
BatchNorm updates. Narrow copies (one block per stage for the ResNets) carry
the gradient checks; the registered networks at their own widths are checked
on eval logits. The twin tests skip where torch is not installed.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmim_jax import binarize, models
from cmim_jax.models import sdbnn_convert
from torch_twins import parity

KEY = jax.random.key(0, impl="rbg")
X_SHAPE = (2, 32, 32, 3)
NUM_CLASSES = 10
# EDE at 2/3 of SD-BNN's ResNet schedule (t from 1e-3 to 10): t = 0.46, k = 1/t.
K, T = (float(v) for v in binarize.ede_schedule(2 / 3, t_min=1e-3, t_max=10.0))
# Narrow copies: (twin kwargs, model kwargs). ASD's hidden width is C // 16,
# so every binary conv keeps at least 16 input channels.
NARROW = {
    "resnet20_sdbnn": ({"blocks": (1, 1, 1)}, {"stage_sizes": (1, 1, 1)}),
    "resnet18_sdbnn": ({"widths": (16, 32, 64, 128), "blocks": (1, 1, 1, 1)},
                       {"widths": (16, 32, 64, 128), "stage_sizes": (1, 1, 1, 1)}),
    "vgg_small_sdbnn": ({"widths": (16, 16, 32, 32, 64, 64)},
                        {"widths": (16, 16, 32, 32, 64, 64)}),
}


flat = parity.flat


def _values(name, t, draws):
  """Generic values: BN affines and WSD logits; ASD and FP weights fan-in
  scaled (parity.randomize)."""
  if name.endswith("alpha"):
    return draws.normal(t.shape, 1.0)
  if t.ndim == 1:  # BN scale/bias, fc bias
    return (1.0 if name.endswith("weight") else 0.0) + draws.normal(t.shape, 0.2)
  return None


def _randomize(twin, seed):
  """parity.randomize, then binary kernels whose filters have clearly nonzero
  means (WSD shifts by them)."""
  import torch  # pylint: disable=g-import-not-at-top
  draws = parity.randomize(twin, seed, _values)
  with torch.no_grad():
    for _, conv in twin.binary_convs():
      conv.weight.add_(draws.normal((conv.weight.shape[0], 1, 1, 1), 0.5))


def _library_path(name):
  """The library module of a twin's binary conv (``layer2.0.conv1``)."""
  m = re.fullmatch(r"layer(\d+)\.(\d+)\.(conv\d)", name)
  return f"stage{m.group(1)}_block{int(m.group(2)) + 1}/{m.group(3)}" if m else name


def _twin_and_model(arch, seed, narrow):
  import torch  # pylint: disable=g-import-not-at-top
  from torch_twins import sdbnn_cifar_torch  # pylint: disable=g-import-not-at-top
  twin_kw, model_kw = NARROW[arch] if narrow else ({}, {})
  twin = sdbnn_cifar_torch.MODELS[arch](NUM_CLASSES, **twin_kw).to(torch.float64)
  twin.set_schedule(K, T)
  _randomize(twin, seed)
  state = {k: v.numpy().copy() for k, v in twin.state_dict().items()}
  model = models.get_model(arch, num_classes=NUM_CLASSES, dtype=jnp.float64, **model_kw)
  return twin, state, model


def test_unknown_arch_and_keys_are_named():
  with pytest.raises(ValueError, match="unknown arch 'resnet34'.*resnet20_sdbnn"):
    sdbnn_convert.from_official_state_dict({}, "resnet34")
  # An option-B shortcut is not ResNet-20's; a fourth stage is not either.
  with pytest.raises(ValueError, match=r"ResNet20.*'layer2\.0\.shortcut\.0\.weight'.*'layer4"):
    sdbnn_convert.from_official_state_dict(
        {"layer2.0.shortcut.0.weight": np.zeros((32, 16, 1, 1)),
         "layer4.0.conv1.weight": np.zeros((8, 8, 3, 3))}, "resnet20_sdbnn")
  with pytest.raises(ValueError, match=r"VGG-Small.*'conv0\.alpha'"):  # conv0 is FP
    sdbnn_convert.from_official_state_dict({"conv0.alpha": np.zeros((4,))}, "vgg_small_sdbnn")


@pytest.mark.parametrize("arch", list(NARROW))
def test_equals_pytorch_twin(arch):
  pytest.importorskip("torch", reason="the PyTorch twin needs torch")
  convert = functools.partial(sdbnn_convert.from_official_state_dict, arch=arch)
  twin, state, model = _twin_and_model(arch, seed=0, narrow=True)
  # Logits, BatchNorm updates and the gradients of every parameter (WSD's a and
  # ASD's weights included) and the input. EDE's tanh runs in float32 in the
  # library: 1e-5, not 1e-9.
  want, sown, grads = parity.compare(twin, state, model, convert, x_shape=X_SHAPE,
                                     num_classes=NUM_CLASSES, key=KEY,
                                     schedule={"k": K, "t": T})
  want_acts = {_library_path(n): (c.a_F, c.a_B) for n, c in twin.binary_convs()}

  # ASD's shifted input of each binary conv (eval mode) and its sign.
  assert len(sown) == 2 * len(want_acts)
  for path, (a_f, a_b) in want_acts.items():
    np.testing.assert_allclose(sown[f"{path}/a_F"][0], parity.nhwc(a_f), rtol=1e-12,
                               atol=1e-12, err_msg=path)
    np.testing.assert_array_equal(sown[f"{path}/a_B"][0], parity.nhwc(a_b))

  # Nonzero, so the comparison tests something. ASD's hidden layer has
  # C // 16 units (1 at 16 channels); where its ReLU is off for both samples,
  # that conv's ASD gets no gradient, in both implementations.
  dead = {k for k, g in flat(grads).items() if np.abs(g).max() == 0}
  assert all("/input_shift/" in k for k in dead), sorted(dead)
  assert len(dead) <= len(want_acts), sorted(dead)  # at least half the ASD kernels live


@pytest.mark.parametrize("arch", list(NARROW))
def test_registered_network_logits_equal_pytorch_twin(arch):
  """The registered network at its own widths and depth (eval logits)."""
  pytest.importorskip("torch", reason="the PyTorch twin needs torch")
  twin, state, model = _twin_and_model(arch, seed=3, narrow=False)
  x = np.random.default_rng(2).normal(size=(1, 32, 32, 3))
  # As a DataParallel checkpoint names them (the official trainers save that).
  state = {f"module.{k}": v for k, v in state.items()}
  parity.assert_logits_close(
      parity.flax_eval_logits(model, sdbnn_convert.from_official_state_dict(state, arch), x,
                              key=KEY),
      parity.twin_eval_logits(twin, x))
