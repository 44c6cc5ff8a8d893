"""Tests for the ImageNet Bi-Real ResNet-18 and configs/imagenet.py."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import traverse_util

from cmim_jax import layers, losses, models, train
from configs import imagenet

# XLA:CPU compiles threefry slowly; rbg keys compile fast.
KEY = jax.random.key(0, impl="rbg")
X64 = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)


# Published parameter count of ResNet-18 for ImageNet (1000 classes), which
# Bi-Real Net 18 shares: the same convs, BNs and classifier, its 2x2 average
# pool adding no weights. Source: torchvision's model card,
# https://pytorch.org/vision/stable/models/generated/torchvision.models.resnet18.html
# (ResNet18_Weights.IMAGENET1K_V1, "num_params: 11689512").
RESNET18_IMAGENET_PARAMS = 11_689_512
BINARY_PATHS = [f"stage{s}_block{b}/conv{c}" for s in (1, 2, 3, 4) for b in (1, 2)
                for c in (1, 2)]


def n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def shapes(name, **kwargs):
  return jax.eval_shape(lambda x: models.get_model(name, **kwargs).init(KEY, x, train=False), X64)


class BiRealNet18Test(parameterized.TestCase):

  @parameterized.parameters("birealnet18", "birealnet18_fp")
  def test_param_count(self, name):
    variables = shapes(name)
    self.assertEqual(n_params(variables["params"]), RESNET18_IMAGENET_PARAMS)
    self.assertNotIn("head_bn", variables["params"])
    self.assertEqual(variables["params"]["stem_conv"]["kernel"].shape, (7, 7, 3, 64))
    down = variables["params"]["stage2_block1"]["downsample"]["kernel"]
    self.assertEqual(down.shape, (1, 1, 64, 128))
    self.assertNotIn("downsample", variables["params"]["stage2_block2"])

  def test_defaults_are_bireal(self):
    model = models.get_model("birealnet18")
    self.assertEqual((model.input_quantizer, model.kernel_quantizer, model.num_classes,
                      model.stem, model.shortcut, model.head_bn),
                     ("approx_sign", "xnor_weight", 1000, "imagenet", "avgpool_real", False))

  def test_sown_paths_in_order(self):
    acts = shapes("birealnet18")[layers.BINARY_ACTS]
    self.assertEqual(losses.binary_layer_paths(acts), BINARY_PATHS)  # 16, FP shortcuts
    self.assertEqual(losses.select_layers(BINARY_PATHS, "last:3"),
                     [f"stage{s}_block2/conv2" for s in (2, 3, 4)])
    self.assertNotIn(layers.BINARY_ACTS, shapes("birealnet18_fp"))

  def test_forward_64x64(self):
    # Stem /2, max-pool /2, three strided stages: 64 -> 16 -> 2 (then GAP).
    model = models.get_model("birealnet18", num_classes=7)
    rng = np.random.default_rng(0)
    variables = {col: jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype)
                                   if col == "params" else np.ones(s.shape, s.dtype),
                                   shapes("birealnet18", num_classes=7)[col])
                 for col in ("params", "batch_stats")}
    x = jnp.asarray(rng.normal(size=X64.shape), jnp.float32)
    logits, state = jax.jit(lambda v, x: model.apply(
        v, x, train=False, mutable=[layers.BINARY_ACTS]))(variables, x)
    chex.assert_shape(logits, (1, 7))
    chex.assert_tree_all_finite(logits)
    acts = traverse_util.flatten_dict(dict(state[layers.BINARY_ACTS]), sep="/")
    self.assertEqual(acts["stage1_block1/conv1/a_B"][0].shape, (1, 16, 16, 64))
    self.assertEqual(acts["stage4_block2/conv2/a_B"][0].shape, (1, 2, 2, 512))
    np.testing.assert_array_equal(np.abs(np.asarray(acts["stage3_block1/conv1/a_B"][0])), 1.0)

  def test_unknown_stem(self):
    with self.assertRaisesRegex(ValueError, "unknown stem 'big'"):
      jax.eval_shape(lambda x: models.get_model("birealnet18", stem="big").init(
          KEY, x, train=False), X64)


class ImageNetConfigTest(parameterized.TestCase):

  @parameterized.parameters("", "smoke")
  def test_config_loads_and_validates(self, variant):
    config = imagenet.get_config(variant)
    train.validate_config(config)  # Every default key present, values valid.
    self.assertEqual(config.model.name, "birealnet18")
    self.assertIn(config.model.name, models.MODEL_NAMES)
    # Shards, else an image folder, else tfds; streamed, never decoded whole.
    self.assertEqual((config.data.name, config.data.source, config.data.pipeline),
                     ("imagenet2012", "auto", "stream"))

  def test_full_and_smoke_values(self):
    full, smoke = imagenet.get_config(), imagenet.get_config("smoke")
    self.assertEqual((full.data.image_size, full.data.eval_split, full.batch_size,
                      full.num_epochs, full.optimizer, full.lr_schedule),
                     (224, "validation", 512, 256.0, "adam", "linear"))
    self.assertEqual((smoke.data.image_size, smoke.data.eval_split, smoke.batch_size,
                      smoke.num_train_steps), (64, "train[:256]", 32, 20))
