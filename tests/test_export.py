"""Packed 1-bit export: bit packing, the XNOR-popcount convolution against a
hand-written NumPy convolution, and every registered binary model's packed
logits against its eval-mode float forward."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmim_jax import models
from cmim_jax import export
from cmim_jax.export import infer, pack


# --------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------

def np_sign(x):
  return np.where(x >= 0, 1, -1).astype(np.int64)


def np_conv_zero_padded(xs, ws, strides, padding):
  """``sum_taps xs * ws`` over taps inside the image (padding contributes 0).

  xs: int [b, h, w, c] of +-1; ws: int [kh, kw, c, o] of +-1.
  """
  b, h, w, c = xs.shape
  kh, kw, _, o = ws.shape
  (pt, pb), (pl, pr) = padding
  xp = np.zeros((b, h + pt + pb, w + pl + pr, c), np.int64)
  xp[:, pt:pt + h, pl:pl + w] = xs
  ho = (h + pt + pb - kh) // strides[0] + 1
  wo = (w + pl + pr - kw) // strides[1] + 1
  out = np.zeros((b, ho, wo, o), np.int64)
  for i in range(ho):
    for j in range(wo):
      patch = xp[:, i * strides[0]:i * strides[0] + kh, j * strides[1]:j * strides[1] + kw]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, ws)
  return out


# --------------------------------------------------------------------------
# Packing and the binary convolution
# --------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 31, 32, 33, 70])
def test_pack_bits_layout_and_roundtrip(channels):
  rng = np.random.default_rng(channels)
  bits = rng.random((3, channels)) < 0.5
  words = np.asarray(infer.pack_bits(jnp.asarray(bits)))
  assert words.dtype == np.uint32 and words.shape == (3, -(-channels // 32))
  np.testing.assert_array_equal(words, infer.pack_bits_np(bits))
  np.testing.assert_array_equal(infer.unpack_bits_np(words, channels), bits)
  # Channel c is bit c % 32 of word c // 32.
  for c in range(channels):
    np.testing.assert_array_equal((words[:, c // 32] >> (c % 32)) & 1, bits[:, c])


def test_narrow_words_compute_the_same_conv_and_kernel_words():
  """Format 2's uint8 / uint16 words (cin <= 8 / <= 16): the same bits, the same
  XNOR-popcount result and the same C++ kernel words as uint32 words."""
  from cmim_jax.export import ffi  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(5)
  for cin, dtype in ((5, np.uint8), (13, np.uint16), (20, np.uint32)):
    bits = infer.pack_bits_np(rng.random((3, 3, 7, cin)) < 0.5)
    narrow = infer.narrow_words(bits, cin)
    assert narrow.dtype == dtype
    np.testing.assert_array_equal(narrow.astype(np.uint32), bits)
    x = jnp.asarray(rng.normal(size=(2, 5, 6, cin)).astype(np.float32))
    kw = dict(cin=cin, strides=(1, 1), padding=((1, 1), (1, 1)))
    border = infer.border_map(infer.kernel_sign_sums(bits, cin), (5, 6), (1, 1), kw["padding"])
    border_n = infer.border_map(infer.kernel_sign_sums(narrow, cin), (5, 6), (1, 1), kw["padding"])
    np.testing.assert_array_equal(border_n, border)
    np.testing.assert_array_equal(np.asarray(infer.xnor_conv(x, narrow, border=border_n, **kw)),
                                  np.asarray(infer.xnor_conv(x, bits, border=border, **kw)))
    np.testing.assert_array_equal(ffi.kernel_words(narrow, cin), ffi.kernel_words(bits, cin))


@pytest.mark.parametrize("cin,kernel,strides,padding", [
    (3, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (40, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (64, (1, 1), (2, 2), ((0, 0), (0, 0))),
    (16, (3, 3), (1, 2), ((2, 0), (0, 1))),  # asymmetric padding, unequal strides
    (33, (2, 3), (1, 1), ((0, 1), (1, 1))),
])
def test_xnor_conv_equals_zero_padded_sign_conv(cin, kernel, strides, padding):
  rng = np.random.default_rng(cin)
  x = rng.normal(size=(2, 7, 6, cin)).astype(np.float32)
  x[0, 0, :3] = 0.0  # sign(0) = +1, as in training
  x[1, 2, 1] = -0.0
  w_signs = rng.random((*kernel, cin, 5)) < 0.5
  bits = infer.pack_bits_np(np.transpose(w_signs, (0, 1, 3, 2)))
  border = infer.border_map(infer.kernel_sign_sums(bits, cin), x.shape[1:3], strides, padding)
  got = infer.xnor_conv(jnp.asarray(x), jnp.asarray(bits), cin=cin, strides=strides,
                        padding=padding, border=border if any(sum(padding, ())) else None)
  want = np_conv_zero_padded(np_sign(x), np.where(w_signs, 1, -1), strides, padding)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), want)


def test_padded_taps_count_zero_at_the_borders():
  """All +1 inputs and kernel, 3x3, padding 1: a corner sees 4 taps, an edge 6,
  the interior 9 (a padded zero is neither +1 nor -1)."""
  cin = 5
  bits = infer.pack_bits_np(np.ones((3, 3, 1, cin), bool))
  border = infer.border_map(infer.kernel_sign_sums(bits, cin), (4, 4), (1, 1), ((1, 1), (1, 1)))
  got = np.asarray(infer.xnor_conv(jnp.ones((1, 4, 4, cin)), jnp.asarray(bits), cin=cin,
                                   strides=(1, 1), padding=((1, 1), (1, 1)), border=border))
  taps = np.array([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]])
  np.testing.assert_array_equal(got[0, :, :, 0], cin * taps)
  # Without the border map the padded taps would each count as -1 * cin.
  raw = np.asarray(infer.xnor_conv(jnp.ones((1, 4, 4, cin)), jnp.asarray(bits), cin=cin,
                                   strides=(1, 1), padding=((1, 1), (1, 1)), border=None))
  np.testing.assert_array_equal(raw[0, :, :, 0], cin * taps - cin * (9 - taps))


# --------------------------------------------------------------------------
# Every registered model
# --------------------------------------------------------------------------

# Tiny widths keep the test fast; the architecture (blocks, shortcuts, stems,
# quantizers) is the registered one.
# One block per stage still has every block kind, shortcut and stride.
_TINY = {"ResNet": dict(widths=(8, 16, 24, 40), stage_sizes=(1, 1, 1, 1)),
         "VGGSmall": dict(widths=(8, 16, 16, 24, 24, 40)),
         # Doubling at stride 1 and 2, keeping at stride 1 (stem stride: the model's).
         "ReActNetA": dict(widths=(8, 16, 32, 32, 64), strides=(1, 1, 2, 1, 2))}


def _tiny_model(name):
  model = models.get_model(name, num_classes=7)
  for cls, kw in _TINY.items():
    if type(model).__name__ == cls:
      kw = dict(kw)
      if "stage_sizes" in kw:
        n = len(model.stage_sizes)
        kw["widths"], kw["stage_sizes"] = kw["widths"][:n], kw["stage_sizes"][:n]
      if "strides" in kw:
        kw["strides"] = (model.strides[0],) + kw["strides"][1:]
      return models.get_model(name, num_classes=7, **kw)
  return model


def _input_shape(model):
  return (32, 32, 3) if getattr(model, "stem", "cifar") == "imagenet" else (8, 8, 3)


def randomized_variables(model, input_shape, seed=0):
  """Random variables of the model's structure (``eval_shape`` of its init: no
  compile), with BatchNorm statistics and affine away from their defaults
  (negative scales too) so that the per-channel affine is really exercised."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jnp.zeros((1, *input_shape)))
  shapes = {k: shapes[k] for k in ("params", "batch_stats")}
  rng = np.random.default_rng(seed)
  def draw(path, s):
    key = jax.tree_util.keystr(path)
    if key.endswith("['var']"):
      return rng.uniform(0.3, 2.0, s.shape).astype(np.float32)
    if key.endswith("['scale']"):
      return (rng.uniform(0.5, 1.5, s.shape) * rng.choice([-1, 1], s.shape)).astype(np.float32)
    if key.endswith("['kernel']"):
      fan_in = int(np.prod(s.shape[:-1]))
      return rng.normal(0, (2 / fan_in) ** 0.5, s.shape).astype(np.float32)
    return rng.normal(0, 0.3, s.shape).astype(np.float32)  # means, biases, WSD's a
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _images(shape, n=6, seed=1):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, *shape)).astype(np.uint8)
  images[0] = 0  # flat images: every binary layer sees ties at the borders
  images[1] = 255
  return images


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_registered_model_is_exact_or_refused_by_name(name, tmp_path):
  model = _tiny_model(name)
  shape = _input_shape(model)
  try:
    pack.check_exportable(model, name)
  except pack.NotExportableError as e:
    assert repr(name) in str(e)
    # Only models without binary layers may be refused: every registered
    # binary architecture has a packed exporter.
    assert "full precision" in str(e), str(e)
    return
  variables = randomized_variables(model, shape)
  path = str(tmp_path / "m.cmimbnn")
  result = export.save(path, model, variables, model_name=name, input_shape=shape,
                       mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
  packed = export.load(path)
  assert packed.manifest["model_name"] == name
  assert result.binary_layers == sum(l["op"] == "bconv" for l in packed.manifest["layers"]) > 0
  r = export.compare(packed, model, variables, _images(shape))
  assert r["argmax_agree"] == 1.0, r
  assert r["max_abs_diff"] <= 1e-5 * r["max_abs_logit"] + 1e-6, r
  # Tight: every binary conv is an exact integer times alpha on both sides,
  # so only the float head's summation order may differ (a flipped sign
  # anywhere would move the logits by far more).
  assert r["max_abs_diff"] <= 1e-6 * r["max_abs_logit"] + 1e-7, r


def test_bn_fold_handles_maxpool_between_conv_and_bn():
  """VGG pools between the binary conv and its BN; with a negative BN scale
  pooling the affine output would be wrong, so the affine must follow the pool."""
  model = _tiny_model("vgg_small")
  v = randomized_variables(model, (8, 8, 3), seed=3)
  v["params"] = jax.tree.map(np.asarray, v["params"])
  for i in range(1, 6):
    v["params"][f"bn{i}"]["scale"] = -np.abs(v["params"][f"bn{i}"]["scale"])
  body, arrays = pack.pack_model(model, v, input_shape=(8, 8, 3), mean=0.5, std=0.25,
                                 model_name="vgg_small")
  ops = [l["op"] for l in body["layers"]]
  assert ops[ops.index("bconv") + 1:ops.index("bconv") + 3] == ["max_pool", "bn"]
  r = export.compare(export.PackedModel(body, arrays), model, v, _images((8, 8, 3)))
  assert r["argmax_agree"] == 1.0 and r["max_abs_diff"] <= 1e-5 * r["max_abs_logit"] + 1e-6, r


def test_packed_size_is_about_32x_smaller_for_binary_weights():
  model = models.get_model("resnet18", num_classes=10)
  variables = randomized_variables(model, (32, 32, 3))
  body, arrays = pack.pack_model(model, variables, input_shape=(32, 32, 3), mean=0.5, std=0.5,
                                 model_name="resnet18")
  bconv_names = [l["name"] for l in body["layers"] if l["op"] == "bconv"]
  def kernel(name):
    node = variables["params"]
    for p in name.split("/"):
      node = node[p]
    return node["kernel"]
  latent = sum(kernel(n).nbytes for n in bconv_names)
  bits = sum(arrays[f"{n}/bits"].nbytes for n in bconv_names)
  # Every ResNet-18 binary conv has a multiple of 32 input channels: exactly 32x.
  assert latent == 32 * bits
  total_float = pack.float_size_bytes(variables)
  total_packed = sum(a.nbytes for a in arrays.values())
  # The float stem, head, BN vectors and scales are what keeps it from 32x.
  assert 25 < total_float / total_packed < 32, (total_float, total_packed)


def test_full_width_resnet18_is_exact():
  """The registered ResNet-18 at full width and CIFAR size (the tiny variants
  above cover every architecture; this checks the real layer sizes)."""
  model = models.get_model("resnet18", num_classes=10)
  shape = (32, 32, 3)
  v = randomized_variables(model, shape, seed=11)
  body, arrays = pack.pack_model(model, v, input_shape=shape, mean=0.5, std=0.25,
                                 model_name="resnet18")
  r = export.compare(export.PackedModel(body, arrays), model, v, _images(shape, n=8))
  assert r["argmax_agree"] == 1.0 and r["max_abs_diff"] <= 1e-5 * r["max_abs_logit"] + 1e-6, r
  assert r["max_abs_diff"] <= 1e-6 * r["max_abs_logit"], r


def test_reactnet_shift_and_rprelu_are_packed_where_training_puts_them():
  """ReActNet: RSign's shift feeds each binary conv's sign but not the
  shortcut, RPReLU follows each add. Each packed op is needed: dropping the
  shifts or the RPReLUs, or shifting the shortcut too, breaks the match."""
  name = "reactnet18"
  model = _tiny_model(name)
  shape = _input_shape(model)
  v = randomized_variables(model, shape, seed=5)
  body, arrays = pack.pack_model(model, v, input_shape=shape, mean=0.5, std=0.25,
                                 model_name=name)
  ops = [l["op"] for l in body["layers"]]
  assert ops.count("channel_add") == ops.count("bconv") == 8
  assert ops.count("rprelu") == 8
  for i, layer in enumerate(body["layers"]):
    if layer["op"] == "channel_add":  # straight into its conv, off the block input
      conv = body["layers"][i + 1]
      assert conv["op"] == "bconv" and conv["src"] == layer["dst"] != layer["src"]
      np.testing.assert_array_equal(arrays[f"{layer['name']}/bias"],
                                    _leaf(v["params"], conv["name"])["input_shift"]["beta"])
  x = jnp.asarray(_images(shape), jnp.float32) / 255.0 * 4.0 - 2.0  # mean 0.5, std 0.25
  ref = np.asarray(jax.jit(functools.partial(model.apply, train=False))(v, x))
  def run(layers):
    return np.asarray(jax.jit(export.PackedModel({**body, "layers": layers}, arrays).forward)(x))
  def mismatch(layers):
    return np.max(np.abs(run(layers) - ref)) / np.max(np.abs(ref))
  layers = body["layers"]
  got = run(layers)
  np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
  assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref)) + 1e-6
  def shift_src(i):  # the register a shift reads (the block input)
    return layers[i - 1]["src"]
  # The conv binarizes the unshifted input.
  no_shift = [dict(l, src=shift_src(i)) if l["op"] == "bconv" and l["src"] == "s" else l
              for i, l in enumerate(layers) if l["op"] != "channel_add"]
  assert mismatch(no_shift) > 1e-3
  assert mismatch([l for l in layers if l["op"] != "rprelu"]) > 1e-3
  # Shift the block input in place, as if the shortcut saw the shifted input.
  in_place = [dict(l, dst=l["src"]) if l["op"] == "channel_add" else
              dict(l, src=shift_src(i)) if l["op"] == "bconv" and l["src"] == "s" else l
              for i, l in enumerate(layers)]
  assert mismatch(in_place) > 1e-3


def _leaf(tree, path):
  for p in path.split("/"):
    tree = tree[p]
  return tree


@pytest.mark.slow  # ~6 s alone, ~40 s on a 2-core CPU shared with other jobs
def test_birealnet18_at_224_matches_eval_tightly():
  """Bi-Real Net-18 at ImageNet size (the largest activations, 56x56x64 in
  stage 1): the training model's binary conv sums exact integers and scales
  after, so no binarized activation differs from the packed model's. (When
  the float conv summed +-alpha terms, its rounding flipped signs near zero
  and the logits differed by up to 2e-3 of their range.)"""
  model = models.get_model("birealnet18", num_classes=1000)
  shape = (224, 224, 3)
  v = randomized_variables(model, shape, seed=11)
  body, arrays = pack.pack_model(model, v, input_shape=shape, mean=0.5, std=0.25,
                                 model_name="birealnet18")
  images = _images(shape, n=3)
  r = export.compare(export.PackedModel(body, arrays, kernel="pure"), model, v, images)
  # Before: 1.4e-4 of the logits' range here (sign flips from 1e-6 on).
  # Now: the float head's summation order at most (bit-identical on CPU).
  assert r["argmax_agree"] == 1.0 and r["max_abs_diff"] <= 1e-6 * r["max_abs_logit"], r
  # The C++ kernel path (the CPU default): its neighbouring float ops are fused
  # differently by XLA (one ulp), which at this depth and size flips a few
  # near-zero signs: measured 1.4e-4 of the range, classes identical. Far
  # below what a structural error moves (> 1e-3, see the ReActNet test).
  r = export.compare(export.PackedModel(body, arrays, kernel="auto"), model, v, images)
  assert r["argmax_agree"] == 1.0 and r["max_abs_diff"] <= 1e-3 * r["max_abs_logit"], r


def test_batch_norm_equals_flax_eval_bit_for_bit():
  """The packed BatchNorm, with its multiplier computed at load time, gives
  flax.linen.BatchNorm's eval output to the bit (the next layer binarizes it).
  On these values the multiplier folded by XLA from constants differs by up
  to 5e-7."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(12)
  c = 96
  x = rng.normal(size=(4, 5, 5, c)).astype(np.float32)
  v = {"params": {"scale": rng.uniform(-2, 2, c).astype(np.float32),
                  "bias": rng.normal(size=c).astype(np.float32)},
       "batch_stats": {"mean": rng.normal(size=c).astype(np.float32),
                       "var": rng.uniform(1e-3, 3, c).astype(np.float32)}}
  bn = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
  want = np.asarray(jax.jit(bn.apply)(v, x))
  (mul,) = infer.bn_multipliers([(v["batch_stats"]["var"], v["params"]["scale"], 1e-5)])
  got = np.asarray(jax.jit(lambda x: infer._batch_norm(  # pylint: disable=protected-access
      x, v["batch_stats"]["mean"], mul, v["params"]["bias"]))(x))
  np.testing.assert_array_equal(got, want)
