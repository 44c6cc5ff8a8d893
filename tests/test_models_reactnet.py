"""Bi-Real Net and ReActNet ResNet-18 (cmim_jax.models.birealnet).

The parity tests load the same random weights into the JAX models and into
a PyTorch twin written from the official code (tests/torch_twins), and
compare logits, BatchNorm updates, sown activations and gradients in
float64. They skip where torch is not installed.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmim_jax import layers, losses, models
from cmim_jax.models import birealnet
from torch_twins import parity

# XLA:CPU compiles threefry slowly; rbg keys compile fast.
KEY = jax.random.key(0, impl="rbg")
X32 = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
NAMES = ("birealnet18", "birealnet18_fp", "reactnet18", "reactnet18_fp")


def conv(k, cin, cout):
  return k * k * cin * cout


def bn(c):
  return 2 * c  # scale and bias (running statistics are batch_stats)


# (c_in, c_out) of the 16 binary 3x3 convs, each with its own shortcut.
UNITS = ([(64, 64)] * 4 + [(64, 128)] + [(128, 128)] * 3 + [(128, 256)] + [(256, 256)] * 3
         + [(256, 512)] + [(512, 512)] * 3)
BIREALNET18 = (conv(7, 3, 64) + bn(64)                                       # stem
               + sum(conv(3, ci, co) + bn(co) for ci, co in UNITS)            # units
               + sum(conv(1, ci, co) + bn(co) for ci, co in UNITS if ci != co)  # downsample
               + 512 * 1000 + 1000)                                          # fc
# RSign's beta (c_in) and RPReLU's gamma, slope and zeta (3 c_out) per unit.
REACTNET18 = BIREALNET18 + sum(ci + 3 * co for ci, co in UNITS)
BINARY_PATHS = [f"stage{s}_block{b}/conv{c}" for s in (1, 2, 3, 4) for b in (1, 2)
                for c in (1, 2)]


def n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def shapes(name, **kwargs):
  return jax.eval_shape(lambda x: models.get_model(name, **kwargs).init(KEY, x, train=False), X32)


flat = parity.flat


class TestStructure:

  def test_hand_counts(self):
    # Bi-Real ResNet-18 has torchvision resnet18's convs and BNs.
    assert BIREALNET18 == 11_689_512
    assert REACTNET18 - BIREALNET18 == 14_912

  @pytest.mark.parametrize("name,expected", [
      ("birealnet18", BIREALNET18), ("birealnet18_fp", BIREALNET18),
      ("birealnet18_clipped", BIREALNET18), ("reactnet18", REACTNET18),
      ("reactnet18_fp", REACTNET18)])
  def test_param_count(self, name, expected):
    assert n_params(shapes(name)["params"]) == expected

  def test_reactnet_parameters_sit_in_the_block(self):
    block = shapes("reactnet18")["params"]["stage2_block1"]
    chex.assert_shape(block["conv1"]["input_shift"]["beta"], (64,))  # RSign on c_in
    chex.assert_shape(block["conv2"]["input_shift"]["beta"], (128,))
    for act in ("act1", "act2"):
      assert sorted(block[act]) == ["gamma", "slope", "zeta"]
      chex.assert_shape(block[act]["slope"], (128,))
    chex.assert_shape(block["downsample"]["kernel"], (1, 1, 64, 128))
    assert "act1" not in shapes("birealnet18")["params"]["stage2_block1"]

  @pytest.mark.parametrize("name", ["birealnet18", "reactnet18"])
  def test_sown_paths_and_default_taps(self, name):
    acts = shapes(name)[layers.BINARY_ACTS]
    assert losses.binary_layer_paths(acts) == BINARY_PATHS  # 16; FP shortcuts sow nothing
    assert losses.select_layers(BINARY_PATHS, "last:3") == [
        f"stage{s}_block2/conv2" for s in (2, 3, 4)]
    assert layers.BINARY_ACTS not in shapes(name + "_fp")

  def test_defaults(self):
    for name in ("birealnet18", "reactnet18"):
      model = models.get_model(name)
      assert (model.input_quantizer, model.kernel_quantizer, model.num_classes,
              model.head_bn, model.stem) == ("approx_sign", "xnor_weight", 1000, False,
                                             "imagenet")

  @pytest.mark.parametrize("name", ["reactnet18", "resnet20_sdbnn"])
  def test_input_shift_computes_in_model_dtype(self, name):
    # A float32 shift output met a bfloat16 kernel in the conv (a TypeError).
    variables = shapes(name, dtype=jnp.bfloat16)
    acts = flat(variables[layers.BINARY_ACTS])
    chex.assert_type([acts["stage1_block1/conv1/a_F"][0], acts["stage1_block1/conv1/a_B"][0]],
                     jnp.bfloat16)
    assert {np.dtype(a.dtype) for a in jax.tree.leaves(variables["params"])} == {
        np.dtype(np.float32)}

  def test_rsign_as_input_shift_is_layers_rsign(self):
    # The conv's approx_sign of RSign's shift must be RSign, values and gradients.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 4)), jnp.float32)
    beta = jnp.asarray(rng.normal(0, 0.3, size=(4,)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
    fused = layers.BinaryConv(6, padding=1, input_quantizer="approx_sign",
                              kernel_quantizer="identity",
                              input_shift=functools.partial(layers.RSign, shift_only=True))
    plain = layers.BinaryConv(6, padding=1, input_quantizer="identity",
                              kernel_quantizer="identity")

    def f_fused(x, beta):
      return jnp.sum(jnp.sin(fused.apply(
          {"params": {"kernel": kernel, "input_shift": {"beta": beta}}}, x)))

    def f_plain(x, beta):
      return jnp.sum(jnp.sin(plain.apply(
          {"params": {"kernel": kernel}},
          layers.RSign().apply({"params": {"beta": beta}}, x))))

    np.testing.assert_allclose(f_fused(x, beta), f_plain(x, beta), rtol=1e-6)
    g_fused = jax.grad(f_fused, argnums=(0, 1))(x, beta)
    g_plain = jax.grad(f_plain, argnums=(0, 1))(x, beta)
    assert float(jnp.max(jnp.abs(g_plain[0]))) > 0
    for a, b in zip(g_fused, g_plain):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    _, state = fused.apply({"params": {"kernel": kernel, "input_shift": {"beta": beta}}}, x,
                           mutable=[layers.BINARY_ACTS])
    np.testing.assert_allclose(state[layers.BINARY_ACTS]["a_F"][0], x + beta, rtol=1e-6)


class TestOfficialStateDict:

  def test_unit_names_map_to_blocks(self):
    rng = np.random.default_rng(0)
    sd = {"module.layer3.3.binary_conv.weight": rng.normal(size=(256, 256, 3, 3)),
          "module.layer3.3.move1.bias": rng.normal(size=(1, 256, 1, 1)),
          "module.layer3.3.bn1.running_var": rng.uniform(size=(256,)),
          "module.layer3.3.bn1.num_batches_tracked": np.array(7),
          "module.fc.weight": rng.normal(size=(1000, 512))}
    v = birealnet.from_official_state_dict(sd)
    p = v["params"]["stage3_block2"]
    np.testing.assert_array_equal(p["conv2"]["kernel"],
                                  sd["module.layer3.3.binary_conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["act2"]["gamma"], -sd["module.layer3.3.move1.bias"].ravel())
    np.testing.assert_array_equal(v["batch_stats"]["stage3_block2"]["bn2"]["var"],
                                  sd["module.layer3.3.bn1.running_var"])
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], sd["module.fc.weight"].T)

  def test_unknown_keys_are_listed(self):
    with pytest.raises(ValueError, match=r"layer1\.0\.conv2\.weight.*'head\.bias'"):
      birealnet.from_official_state_dict({"layer1.0.conv2.weight": np.zeros((1,)),
                                          "conv1.weight": np.zeros((64, 3, 7, 7)),
                                          "head.bias": np.zeros((3,))})


# ---------------------------------------------------------------------------
# Parity with the PyTorch twin.

TWIN_CASES = {
    # name: (get_model kwargs, react, binary activations, binary weights)
    "birealnet18": ({}, False, True, True),
    "reactnet18": ({}, True, True, True),
    "reactnet18_step1": ({"kernel_quantizer": "identity"}, True, True, False),
    "birealnet18_fp": ({}, False, False, False),
    "reactnet18_fp": ({}, True, False, False),
}
# Gradients are compared where a surrogate gradient is involved; the other
# cases differ from these only by 'identity' quantizers (plain autodiff).
GRAD_CASES = ("birealnet18", "reactnet18")
NUM_CLASSES = 10


def _values(name, t, draws):
  """Generic values: shifts and biases, BN scales, and binary kernels wide
  enough that the clipped STE cuts some of them (parity.randomize)."""
  is_bn = ".bn1." in name or name.startswith("bn1.") or ".downsample.2." in name
  if is_bn and name.endswith("weight"):
    return draws.uniform(t.shape, 0.5, 1.5)
  if name.endswith("bias"):  # BN, move0/1/2, fc
    return draws.normal(t.shape, 0.2)
  if name.endswith("binary_conv.weight"):
    return draws.normal(t.shape, 0.6)
  return None  # stem, downsample 1x1 and fc kernels: fan-in scaled


# Compiling dominates these tests, so the parity tests use one block (two
# units: the downsampling one and an identity one) per stage and narrow
# widths; test_full_size_logits_equal_pytorch_twin runs the full network.
# 64x64 inputs, not 32x32: stage 4 would be 1x1, and a training-mode
# BatchNorm over 2 values passes (almost) no gradient back.
WIDTHS = (16, 32, 64, 128)
BLOCKS = (1, 1, 1, 1)
X_SHAPE = (2, 64, 64, 3)


def _twin_and_variables(case, widths, num_classes, seed, blocks=(2, 2, 2, 2)):
  import torch  # pylint: disable=g-import-not-at-top
  from torch_twins import reactnet_torch  # pylint: disable=g-import-not-at-top
  kwargs, react, binary_acts, binary_weights = TWIN_CASES[case]
  twin = reactnet_torch.BiRealNetTwin(react, num_classes, widths=widths,
                                      units=tuple(2 * b for b in blocks),
                                      binary_acts=binary_acts,
                                      binary_weights=binary_weights).to(torch.float64)
  parity.randomize(twin, seed, _values)
  state = {k: v.numpy().copy() for k, v in twin.state_dict().items()}
  model = models.get_model(case.replace("_step1", ""), num_classes=num_classes,
                           widths=widths, stage_sizes=blocks, dtype=jnp.float64,
                           **kwargs)
  return twin, state, model


@pytest.mark.parametrize("case", list(TWIN_CASES))
def test_equals_pytorch_twin(case):
  pytest.importorskip("torch", reason="the PyTorch twin needs torch")
  binary_acts = TWIN_CASES[case][2]
  with_grads = case in GRAD_CASES
  twin, state, model = _twin_and_variables(case, WIDTHS, NUM_CLASSES, seed=len(case),
                                           blocks=BLOCKS)
  want, sown, grads = parity.compare(twin, state, model, birealnet.from_official_state_dict,
                                     x_shape=X_SHAPE, num_classes=NUM_CLASSES, key=KEY,
                                     with_grads=with_grads)

  # Sown activations: the input each binary conv binarizes (after RSign's
  # shift) and its sign, as the twin's units saw them in eval mode.
  assert len(sown) == (2 * 2 * sum(BLOCKS) if binary_acts else 0)  # a_F, a_B per conv
  for s, u, unit in twin.units():
    if not binary_acts:
      break
    path = f"stage{s}_block{u // 2 + 1}/conv{u % 2 + 1}"
    for key in ("a_F", "a_B"):
      np.testing.assert_allclose(sown[f"{path}/{key}"][0], parity.nhwc(getattr(unit, key)),
                                 rtol=1e-9, atol=1e-9, err_msg=f"{path}/{key}")
    np.testing.assert_array_equal(np.abs(sown[f"{path}/a_B"][0]), 1.0)

  if with_grads:  # every gradient is far from zero: the comparison tests something
    parity.assert_far_from_zero(grads)


@pytest.mark.parametrize("case", ["birealnet18", "reactnet18"])
def test_full_size_logits_equal_pytorch_twin(case):
  """The registered networks at their own widths and 1000 classes."""
  pytest.importorskip("torch", reason="the PyTorch twin needs torch")
  twin, state, model = _twin_and_variables(case, (64, 128, 256, 512), 1000, seed=3)
  x = np.random.default_rng(2).normal(size=(1, 64, 64, 3))
  parity.assert_logits_close(
      parity.flax_eval_logits(model, birealnet.from_official_state_dict(state), x),
      parity.twin_eval_logits(twin, x))
