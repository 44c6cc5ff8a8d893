"""ReActNet-A (cmim_jax.models.reactnet_a): structure, counts, and parity with a
PyTorch twin written from liuzechun/ReActNet's ``mobilenet/`` code.

The parity tests load the same random weights into both (through
``reactnet_a.from_official_state_dict``) and compare logits, sown
activations, BatchNorm updates and gradients in float64; they skip where
torch is not installed.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmim_jax import layers, losses, models, summary, train
from cmim_jax.models import reactnet_a
from torch_twins import parity

KEY = jax.random.key(0, impl="rbg")  # XLA:CPU compiles threefry slowly.
NAMES = ("reactnet_a", "reactnet_a_fp", "reactnet_a_cifar", "reactnet_a_cifar_fp")
WIDTHS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
# Narrow and short, but every kind of block: doubling at stride 1 (block 1)
# and 2 (blocks 2, 5), keeping at stride 1 (3, 6) and 2 (4). 32x32 inputs
# leave 2x2 maps, so training-mode BatchNorm sees 8 values per channel.
TWIN_WIDTHS = (8, 16, 32, 32, 32, 64, 64)
TWIN_STRIDES = (2, 1, 2, 1, 2, 2, 1)


def hand_count(widths, num_classes):
  """Trainable parameters, written from the block's definition."""
  total = 3 * 3 * 3 * widths[0] + 2 * widths[0]  # stem conv + BN scale/bias
  for c, c_out in zip(widths[:-1], widths[1:]):
    total += c                          # RSign beta before the 3x3 conv
    total += 9 * c * c + 2 * c          # binary 3x3 conv (c -> c) + BN
    total += 3 * c                      # RPReLU gamma, slope, zeta
    total += c                          # RSign beta before the 1x1 conv(s)
    n_pw = c_out // c                   # one 1x1 conv, or two when doubling
    total += n_pw * (c * c + 2 * c)     # binary 1x1 conv(s) (c -> c) + BN
    total += 3 * c_out                  # RPReLU after the 1x1 stage
  return total + widths[-1] * num_classes + num_classes


def hand_macs(widths, strides, size):
  """Binary and real multiply-accumulates per example at ``size x size``."""
  hw = size // strides[0]
  real = hw * hw * 27 * widths[0]
  binary = 0
  for c, c_out, s in zip(widths[:-1], widths[1:], strides[1:]):
    hw //= s
    binary += hw * hw * (9 * c * c + (c_out // c) * c * c)
  return binary, real + widths[-1] * 1000


def n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def shapes(name, size=32, **kwargs):
  return jax.eval_shape(lambda x: models.get_model(name, **kwargs).init(KEY, x, train=False),
                        jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))


flat = parity.flat


class TestStructure:

  def test_hand_count(self):
    # Closed form: 13 blocks, 1024-d features, 1000 classes.
    assert hand_count(WIDTHS, 1000) == 29_343_592

  @pytest.mark.parametrize("name", NAMES)
  def test_param_count(self, name):
    classes = models.get_model(name).num_classes
    assert n_params(shapes(name)["params"]) == hand_count(WIDTHS, classes)

  def test_defaults(self):
    a, cifar = models.get_model("reactnet_a"), models.get_model("reactnet_a_cifar")
    assert (a.num_classes, a.input_quantizer, a.kernel_quantizer) == (
        1000, "approx_sign", "xnor_weight")
    assert tuple(a.strides) == reactnet_a.STRIDES
    assert cifar.num_classes == 10 and tuple(cifar.strides) == reactnet_a.CIFAR_STRIDES
    assert models.get_model("reactnet_a_fp").kernel_quantizer == "identity"

  def test_block_layout(self):
    p = shapes("reactnet_a")["params"]
    # Block 1 doubles 32 -> 64 (two 1x1 convs), block 3 keeps 128.
    chex.assert_shape(p["block1"]["conv1"]["kernel"], (3, 3, 32, 32))
    chex.assert_shape([p["block1"]["conv2_1"]["kernel"], p["block1"]["conv2_2"]["kernel"]],
                      (1, 1, 32, 32))
    chex.assert_shape(p["block1"]["act2"]["slope"], (64,))
    chex.assert_shape(p["block3"]["conv2"]["kernel"], (1, 1, 128, 128))
    assert "conv2" not in p["block1"] and "conv2_1" not in p["block3"]
    assert set(p) == {"fc", "stem_bn", "stem_conv"} | {f"block{i}" for i in range(1, 14)}

  @pytest.mark.parametrize("name,size,maps", [
      ("reactnet_a", 224, (112, 112, 56, 56, 28, 28, 14, 14, 14, 14, 14, 14, 7, 7)),
      ("reactnet_a_cifar", 32, (32, 32, 32, 32, 16, 16, 8, 8, 8, 8, 8, 8, 4, 4))])
  def test_feature_map_sizes(self, name, size, maps):
    s = summary.summarize(models.get_model(name), jax.ShapeDtypeStruct((1, size, size, 3),
                                                                        jnp.float32),
                          train=False)
    out = {r.path: r.output_shape for r in s.layers}
    got = [out["stem_bn"][1]] + [out[f"block{i}/act2"][1] for i in range(1, 14)]
    assert tuple(got) == maps
    assert out["fc"] == (1, models.get_model(name).num_classes)

  def test_sown_taps(self):
    acts = shapes("reactnet_a")[layers.BINARY_ACTS]
    paths = losses.binary_layer_paths(acts)
    # Each block: the 3x3 conv and its 1x1 conv(s); doubling blocks (1, 2, 4, 6, 12) have two.
    doubling = {1, 2, 4, 6, 12}
    want = []
    for i in range(1, 14):
      want.append(f"block{i}/conv1")
      want += ([f"block{i}/conv2_1", f"block{i}/conv2_2"] if i in doubling
               else [f"block{i}/conv2"])
    assert sorted(paths) == sorted(want)
    assert layers.BINARY_ACTS not in shapes("reactnet_a_fp")
    # Step 1 (real weights) still binarizes activations, so it still sows.
    assert sorted(losses.binary_layer_paths(
        shapes("reactnet_a", kernel_quantizer="identity")[layers.BINARY_ACTS])) == sorted(want)
    assert losses.select_layers(paths, "last:1") == ["block13/conv2"]

  def test_features_are_the_pooled_last_block(self):
    # train._apply hands feature terms the input of ``fc``: the pooled last
    # block, 1024-d at the default widths (narrow here to compile fast).
    chex.assert_shape(shapes("reactnet_a_cifar")["params"]["fc"]["kernel"], (1024, 10))
    model = models.get_model("reactnet_a_cifar", widths=TWIN_WIDTHS, strides=TWIN_STRIDES)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)

    def run(x):  # One compilation.
      variables = model.init(KEY, x, train=False)
      variables = {k: v for k, v in variables.items() if k != layers.BINARY_ACTS}
      out = train._apply(model, variables, x, features=True, train=False)
      pooled = model.apply(variables, x, train=False, capture_intermediates=True,
                           mutable=["intermediates"])[1]["intermediates"]["block6"]
      return out, jnp.mean(pooled["__call__"][0], axis=(1, 2)), variables["params"]["fc"]

    (logits, feats), want, p = jax.jit(run)(x)
    chex.assert_shape(feats, (2, TWIN_WIDTHS[-1]))
    np.testing.assert_allclose(feats, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits, feats @ p["kernel"] + p["bias"], rtol=1e-5, atol=1e-5)

  def test_bfloat16(self):
    v = shapes("reactnet_a_cifar", dtype=jnp.bfloat16)
    chex.assert_type(flat(v[layers.BINARY_ACTS])["block2/conv2_1/a_F"][0], jnp.bfloat16)

  def test_bad_widths_and_sizes(self):
    with pytest.raises(ValueError, match="keeps or doubles"):
      shapes("reactnet_a", widths=(32, 64, 256), strides=(2, 1, 2))
    with pytest.raises(ValueError, match="same length"):
      shapes("reactnet_a", widths=(32, 64), strides=(2, 1, 2))
    with pytest.raises(ValueError, match="odd"):
      shapes("reactnet_a", size=36)


class TestCounts:
  """The summary's MACs against a hand count and the ReActNet paper."""

  def test_reactnet_a_matches_paper(self):
    s = summary.summarize(models.get_model("reactnet_a"),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32), train=False)
    binary, real = s.total("binary_macs"), s.total("real_macs")
    assert (binary, real) == hand_macs(WIDTHS, reactnet_a.STRIDES, 224)
    # ReActNet-A as published (Liu et al. 2020): BOPs 4.82e9, FLOPs 0.12e8,
    # OPs = BOPs / 64 + FLOPs = 0.87e8 (the official README's "0.87 x 10^8").
    assert round(binary / 1e9, 2) == 4.82
    assert round(real / 1e8, 2) == 0.12
    assert round((binary / 64 + real) / 1e8, 2) == 0.87

  def test_fp_and_step1_have_no_binary_macs(self):
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    binary, real = hand_macs(WIDTHS, reactnet_a.CIFAR_STRIDES, 32)
    for name, kwargs in (("reactnet_a_cifar_fp", {}),
                         ("reactnet_a_cifar", {"kernel_quantizer": "identity"})):
      s = summary.summarize(models.get_model(name, num_classes=1000, **kwargs), x, train=False)
      assert (s.total("binary_macs"), s.total("real_macs")) == (0, binary + real)
    s = summary.summarize(models.get_model("reactnet_a_cifar", num_classes=1000), x,
                          train=False)
    assert (s.total("binary_macs"), s.total("real_macs")) == (binary, real)


class TestOfficialStateDict:

  def test_names_and_flat_step2_kernels(self):
    rng = np.random.default_rng(0)
    flat_w = rng.normal(size=(64 * 64 * 9, 1))
    sd = {"module.feature.2.binary_3x3.weights": flat_w,
          "module.feature.2.move12.bias": rng.normal(size=(1, 64, 1, 1)),
          "module.feature.2.bn2_1.running_var": rng.uniform(size=(64,)),
          "module.feature.3.binary_pw.weight": rng.normal(size=(128, 128, 1, 1)),
          "module.feature.0.conv1.weight": rng.normal(size=(32, 3, 3, 3)),
          "module.feature.0.bn1.num_batches_tracked": np.array(3),
          "module.fc.weight": rng.normal(size=(1000, 1024))}
    v = reactnet_a.from_official_state_dict(sd)
    p = v["params"]
    np.testing.assert_array_equal(p["block2"]["conv1"]["kernel"],
                                  flat_w.reshape(64, 64, 3, 3).transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["block2"]["act1"]["gamma"],
                                  -sd["module.feature.2.move12.bias"].ravel())
    np.testing.assert_array_equal(v["batch_stats"]["block2"]["bn2_1"]["var"],
                                  sd["module.feature.2.bn2_1.running_var"])
    chex.assert_shape(p["block3"]["conv2"]["kernel"], (1, 1, 128, 128))
    chex.assert_shape(p["stem_conv"]["kernel"], (3, 3, 3, 32))
    np.testing.assert_array_equal(p["fc"]["kernel"], sd["module.fc.weight"].T)
    # The official train.py's checkpoint dict converts the same.
    wrapped = reactnet_a.from_official_state_dict({"epoch": 255, "state_dict": sd})
    np.testing.assert_array_equal(wrapped["params"]["block2"]["conv1"]["kernel"],
                                  p["block2"]["conv1"]["kernel"])

  def test_s2bnn_layout_drops_the_unused_pointwise_convs(self):
    # S2-BNN's ReActNet.py builds both kinds of 1x1 stage in every block
    # (4-D ``weight`` kernels) and uses one: block 1 doubles 32 -> 64, block 3 keeps 128.
    rng = np.random.default_rng(0)

    def bn(prefix, c):
      return {f"{prefix}.{k}": rng.uniform(0.5, 1.5, size=(c,))
              for k in ("weight", "bias", "running_mean", "running_var")}

    used = {"feature.1.binary_pw_down1.weight": rng.normal(size=(32, 32, 1, 1)),
            "feature.1.binary_pw_down2.weight": rng.normal(size=(32, 32, 1, 1)),
            **bn("feature.1.bn2_1", 32), **bn("feature.1.bn2_2", 32),
            "feature.3.binary_pw.weight": rng.normal(size=(128, 128, 1, 1)),
            **bn("feature.3.bn2", 128)}
    unused = {"feature.1.binary_pw.weight": rng.normal(size=(64, 32, 1, 1)),
              **bn("feature.1.bn2", 64),
              "feature.3.binary_pw_down1.weight": rng.normal(size=(128, 128, 1, 1)),
              "feature.3.binary_pw_down2.weight": rng.normal(size=(128, 128, 1, 1)),
              **bn("feature.3.bn2_1", 128), **bn("feature.3.bn2_2", 128)}
    want = reactnet_a.from_official_state_dict(used)
    got = reactnet_a.from_official_state_dict({**used, **unused})
    assert sorted(flat(got["params"])) == sorted(flat(want["params"]))
    assert sorted(flat(got["batch_stats"])) == sorted(flat(want["batch_stats"]))
    for col in ("params", "batch_stats"):
      for k, v in flat(want[col]).items():
        np.testing.assert_array_equal(flat(got[col])[k], v)

  def test_unknown_keys_are_listed(self):
    with pytest.raises(ValueError, match=r"feature\.1\.conv2\.weight.*'head\.bias'"):
      reactnet_a.from_official_state_dict({"feature.1.conv2.weight": np.zeros((1,)),
                                           "fc.bias": np.zeros((3,)),
                                           "head.bias": np.zeros((3,))})


# ---------------------------------------------------------------------------
# Parity with the PyTorch twin.

# name: (get_model kwargs, binary activations, binary weights)
TWIN_CASES = {
    "reactnet_a": ({}, True, True),
    "reactnet_a_step1": ({"kernel_quantizer": "identity"}, True, False),
    "reactnet_a_fp": ({}, False, False),
}
GRAD_CASES = ("reactnet_a", "reactnet_a_step1")
NUM_CLASSES = 10
X_SHAPE = (2, 32, 32, 3)


def _values(name, t, draws):
  """Generic values: shifts and biases, BN scales, and binary kernels wide
  enough that the clipped STE cuts some of them (parity.randomize)."""
  if ".bn" in name and name.endswith(".weight"):
    return draws.uniform(t.shape, 0.5, 1.5)
  if name.endswith(".bias"):  # BN, move*, fc
    return draws.normal(t.shape, 0.2)
  if "binary_" in name:
    return draws.normal(t.shape, 0.6)
  return None  # stem and fc kernels: fan-in scaled


def _twin_and_model(case, widths, strides, num_classes, seed):
  import torch  # pylint: disable=g-import-not-at-top
  from torch_twins import reactnet_a_torch  # pylint: disable=g-import-not-at-top
  kwargs, binary_acts, binary_weights = TWIN_CASES[case]
  twin = reactnet_a_torch.ReActNetATwin(num_classes, widths, strides, binary_acts,
                                        binary_weights).to(torch.float64)
  parity.randomize(twin, seed, _values)
  state = {k: v.numpy().copy() for k, v in twin.state_dict().items()}
  model = models.get_model(case.replace("_step1", ""), num_classes=num_classes,
                           widths=widths, strides=strides, dtype=jnp.float64, **kwargs)
  return twin, state, model


@pytest.mark.parametrize("case", list(TWIN_CASES))
def test_equals_pytorch_twin(case):
  pytest.importorskip("torch", reason="the PyTorch twin needs torch")
  binary_acts = TWIN_CASES[case][1]
  with_grads = case in GRAD_CASES
  twin, state, model = _twin_and_model(case, TWIN_WIDTHS, TWIN_STRIDES, NUM_CLASSES,
                                       seed=len(case))
  want, sown, grads = parity.compare(twin, state, model, reactnet_a.from_official_state_dict,
                                     x_shape=X_SHAPE, num_classes=NUM_CLASSES, key=KEY,
                                     with_grads=with_grads)

  # Sown activations: what each binary conv binarizes (after RSign's shift)
  # and its sign, as the twin's blocks saw them in eval mode.
  n_convs = sum(1 + c2 // c1 for c1, c2 in zip(TWIN_WIDTHS[:-1], TWIN_WIDTHS[1:]))
  assert len(sown) == (2 * n_convs if binary_acts else 0)
  for i, block in enumerate(twin.feature):
    if not (i and binary_acts):
      continue
    convs = {"3x3": ["conv1"], "1x1": (["conv2_1", "conv2_2"] if block.double else ["conv2"])}
    for key, names in convs.items():
      for conv in names:
        for j, what in enumerate(("a_F", "a_B")):
          np.testing.assert_allclose(sown[f"block{i}/{conv}/{what}"][0],
                                     parity.nhwc(block.acts[key][j]), rtol=1e-9, atol=1e-9,
                                     err_msg=f"block{i}/{conv}/{what}")

  if with_grads:  # every gradient is far from zero: the comparison tests something
    parity.assert_far_from_zero(grads)


def test_full_size_logits_equal_pytorch_twin():
  """The registered network at its own widths, strides and 1000 classes."""
  pytest.importorskip("torch", reason="the PyTorch twin needs torch")
  twin, state, model = _twin_and_model("reactnet_a", WIDTHS, reactnet_a.STRIDES, 1000, seed=3)
  x = np.random.default_rng(2).normal(size=(1, 64, 64, 3))
  parity.assert_logits_close(
      parity.flax_eval_logits(model, reactnet_a.from_official_state_dict(state), x),
      parity.twin_eval_logits(twin, x))
