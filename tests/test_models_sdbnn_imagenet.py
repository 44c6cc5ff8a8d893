"""SD-BNN's ImageNet ResNet-18 (cmim_jax.models.sdbnn_imagenet).

The quantizer is checked against numpy; the network against a PyTorch twin
written from the official code (tests/torch_twins/sdbnn_imagenet_torch.py):
same random weights, float64, logits (eval and train), BatchNorm updates,
sown activations and every gradient, for stage 1 (real weights) and stage 2
(WSD weights). The twin tests skip where torch is not installed.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmim_jax import layers, losses, models, quantizers
from cmim_jax.models import sdbnn_imagenet
from torch_twins import parity

KEY = jax.random.key(0, impl="rbg")
# (c_in, c_out) of the 16 binary 3x3 convs.
UNITS = ([(64, 64)] * 4 + [(64, 128)] + [(128, 128)] * 3 + [(128, 256)] + [(256, 256)] * 3
         + [(256, 512)] + [(512, 512)] * 3)
BIREALNET18 = 11_689_512  # torchvision resnet18's count (tests/test_models_imagenet.py)


flat = parity.flat


def test_param_count_and_layout():
  # ASD (two bias-free linears c_in -> c_in/8 -> c_in), WSD's a and PReLU's
  # slope (c_out each) on every binary unit, over Bi-Real's network.
  extra = sum(2 * ci * (ci // 8) + 2 * co for ci, co in UNITS)
  shapes = jax.eval_shape(lambda x: models.get_model("birealnet18_sdbnn").init(
      KEY, x, train=False), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"])) == (
      BIREALNET18 + extra)
  block = shapes["params"]["stage2_block1"]
  chex.assert_shape(block["conv1"]["input_shift"]["fc1"]["kernel"], (64, 8))  # reduction 8
  chex.assert_shape(block["conv1"]["input_shift"]["fc2"]["kernel"], (8, 64))
  chex.assert_shape([block["conv1"]["a"], block["act1"]["slope"], block["act2"]["slope"]], (128,))
  acts = shapes[layers.BINARY_ACTS]
  assert losses.binary_layer_paths(acts) == [
      f"stage{s}_block{b}/conv{c}" for s in (1, 2, 3, 4) for b in (1, 2) for c in (1, 2)]
  model = models.get_model("birealnet18_sdbnn")
  assert (model.input_quantizer, model.kernel_quantizer, model.head_bn, model.stem) == (
      "approx_sign", "wsd_ste_weight", False, "imagenet")


def test_wsd_ste_weight_against_numpy():
  rng = np.random.default_rng(0)
  w = rng.normal(0.3, 0.8, size=(3, 3, 4, 5))
  a = rng.normal(size=(5,))
  g = rng.normal(size=w.shape)
  with jax.enable_x64(True):
    out, vjp = jax.vjp(sdbnn_imagenet.wsd_ste_weight, jnp.asarray(w), jnp.asarray(a))
    gw, ga = vjp(jnp.asarray(g))
  mean = w.reshape(-1, 5).mean(0)
  sig = 1 / (1 + np.exp(-a))
  shifted = w + sig * 0.01 * mean
  pass_ = np.abs(shifted) <= 1
  assert 0 < pass_.mean() < 1  # the clip cuts some gradients
  np.testing.assert_array_equal(out, np.where(shifted >= 0, 1.0, -1.0))
  np.testing.assert_allclose(gw, g * pass_, rtol=1e-12)  # the mean is detached
  np.testing.assert_allclose(ga, (g * pass_).reshape(-1, 5).sum(0) * sig * (1 - sig) * 0.01
                             * mean, rtol=1e-10)
  with pytest.raises(ValueError, match=r"a must have shape \(5,\)"):
    sdbnn_imagenet.wsd_ste_weight(jnp.ones((3, 3, 4, 5)), jnp.ones((4,)))
  assert quantizers.owned_params("wsd_ste_weight")[0][0] == "a"


def test_unknown_keys_are_listed():
  with pytest.raises(ValueError, match=r"'layer1\.0\.binary_conv\.weight'.*'head\.bias'"):
    sdbnn_imagenet.from_official_state_dict({"layer1.0.binary_conv.weight": np.zeros((1,)),
                                             "head.bias": np.zeros((3,))})


# ---------------------------------------------------------------------------
# Parity with the PyTorch twin: one block (two units) per stage, narrow
# widths, 64x64 inputs (stage 4 is 2x2), as in test_models_reactnet.py.

WIDTHS = (16, 32, 64, 128)
BLOCKS = (1, 1, 1, 1)
X_SHAPE = (2, 64, 64, 3)
NUM_CLASSES = 10
CASES = {"stage2": True, "stage1": False}  # binary weights


def _values(name, t, draws):
  """Generic values: WSD logits, BN affines, ASD weights, and latent kernels
  wide enough that the clipped STE cuts some of them (parity.randomize)."""
  if name.endswith("binary_conv.weights"):
    return draws.normal(t.shape, 0.7)
  if name.endswith("binary_conv.alpha"):
    return draws.normal(t.shape, 1.0)
  if t.ndim == 1:  # BN scale/bias, fc bias
    return (1.0 if name.endswith("weight") else 0.0) + draws.normal(t.shape, 0.2)
  return None  # stem, downsample, ASD and fc kernels: fan-in scaled


def _randomize(twin, seed):
  import torch  # pylint: disable=g-import-not-at-top
  draws = parity.randomize(twin, seed, _values)
  with torch.no_grad():
    for _, _, unit in twin.units():  # per-output-channel means for WSD to shift by
      conv = unit.binary_conv
      conv.weights.view(conv.shape).add_(draws.normal((conv.shape[0], 1, 1, 1), 0.5))


def _twin_and_model(binary_weights, widths, num_classes, seed, blocks=(2, 2, 2, 2)):
  import torch  # pylint: disable=g-import-not-at-top
  from torch_twins import sdbnn_imagenet_torch  # pylint: disable=g-import-not-at-top
  twin = sdbnn_imagenet_torch.SDBNNImageNetTwin(
      num_classes, widths=widths, units=tuple(2 * b for b in blocks),
      binary_weights=binary_weights).to(torch.float64)
  _randomize(twin, seed)
  state = {k: v.numpy().copy() for k, v in twin.state_dict().items()}
  kwargs = {} if binary_weights else {"kernel_quantizer": "identity"}
  model = models.get_model("birealnet18_sdbnn", num_classes=num_classes, widths=widths,
                           stage_sizes=blocks, dtype=jnp.float64, **kwargs)
  return twin, state, model


@pytest.mark.parametrize("case", list(CASES))
def test_equals_pytorch_twin(case):
  pytest.importorskip("torch", reason="the PyTorch twin needs torch")
  binary_weights = CASES[case]
  convert = functools.partial(sdbnn_imagenet.from_official_state_dict,
                              binary_weights=binary_weights)
  twin, state, model = _twin_and_model(binary_weights, WIDTHS, NUM_CLASSES, seed=len(case),
                                       blocks=BLOCKS)
  # Logits, BatchNorm updates and the gradients of every parameter (WSD's a in
  # stage 2 included) and the input.
  # (Stage 1 leaves the code's alpha unused: no gradient, and not converted.)
  _, sown, grads = parity.compare(twin, state, model, convert, x_shape=X_SHAPE,
                                  num_classes=NUM_CLASSES, key=KEY)

  # Sown activations: ASD's shifted input of each binary conv and its sign.
  assert len(sown) == 2 * 2 * sum(BLOCKS)
  for s, u, unit in twin.units():
    path = f"stage{s}_block{u // 2 + 1}/conv{u % 2 + 1}"
    for key in ("a_F", "a_B"):
      np.testing.assert_allclose(sown[f"{path}/{key}"][0],
                                 parity.nhwc(getattr(unit.binary_conv, key)), rtol=1e-9,
                                 atol=1e-9, err_msg=f"{path}/{key}")

  assert ("stage1_block1/conv1/a" in flat(grads)) == binary_weights
  for k, g in flat(grads).items():  # every gradient is nonzero: the comparison tests something
    assert np.abs(g).max() > 0, k
  if binary_weights:  # the clipped STE cut some kernel gradients, not all
    assert 0 < np.mean(np.asarray(grads["stage2_block1"]["conv1"]["kernel"]) == 0) < 1


def test_full_size_logits_equal_pytorch_twin():
  """The registered network at its own widths and 1000 classes (stage 2)."""
  pytest.importorskip("torch", reason="the PyTorch twin needs torch")
  twin, state, model = _twin_and_model(True, (64, 128, 256, 512), 1000, seed=3)
  x = np.random.default_rng(2).normal(size=(1, 64, 64, 3))
  parity.assert_logits_close(
      parity.flax_eval_logits(model, sdbnn_imagenet.from_official_state_dict(state), x),
      parity.twin_eval_logits(twin, x))
