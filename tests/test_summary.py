"""Tests for cmim_jax.summary against hand counts."""
import jax
import jax.numpy as jnp
from absl.testing import parameterized

from cmim_jax import layers, models, summary

X = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

# ResNet-18 (CMIM layout) by hand. Binary conv kernels, per stage:
STAGE1_K = 4 * 3 * 3 * 64 * 64
STAGE2_K = 3 * 3 * 64 * 128 + 3 * 3 * 128 * 128 * 3 + 64 * 128  # + binary 1x1 downsample
STAGE3_K = 3 * 3 * 128 * 256 + 3 * 3 * 256 * 256 * 3 + 128 * 256
STAGE4_K = 3 * 3 * 256 * 512 + 3 * 3 * 512 * 512 * 3 + 256 * 512
BINARY_PARAMS = STAGE1_K + STAGE2_K + STAGE3_K + STAGE4_K
# BatchNorm channels: stem, 4 + 5 + 5 + 5 in the stages (downsample BNs), head.
BN_CHANNELS = 64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512 + 512
REAL_PARAMS = 3 * 3 * 3 * 64 + 2 * BN_CHANNELS + 512 * 10 + 10  # stem, BN affine, fc
# MACs per example = output positions x kernel size.
BINARY_MACS = (32 * 32 * STAGE1_K + 16 * 16 * STAGE2_K + 8 * 8 * STAGE3_K + 4 * 4 * STAGE4_K)
REAL_MACS = 32 * 32 * 3 * 3 * 3 * 64 + 512 * 10
DOWNSAMPLE_K = 64 * 128 + 128 * 256 + 256 * 512
DOWNSAMPLE_MACS = 16 * 16 * 64 * 128 + 8 * 8 * 128 * 256 + 4 * 4 * 256 * 512


class SummaryTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.r18 = summary.summarize(models.get_model("resnet18"), X, train=False)

  def test_resnet18_hand_count(self):
    s = self.r18
    self.assertEqual(BINARY_PARAMS, 11_157_504)
    self.assertEqual(s.total("params"), BINARY_PARAMS + REAL_PARAMS)
    self.assertEqual(s.total("batch_stats"), 2 * BN_CHANNELS)
    self.assertEqual(s.total("binary_params"), BINARY_PARAMS)
    self.assertEqual(s.total("binary_macs"), BINARY_MACS)
    self.assertEqual(s.total("real_macs"), REAL_MACS)
    self.assertEqual(s.total("memory_f32"), 4 * (BINARY_PARAMS + REAL_PARAMS + 2 * BN_CHANNELS))
    packed = BINARY_PARAMS // 8 + 4 * (REAL_PARAMS + 2 * BN_CHANNELS)
    self.assertEqual(s.total("memory_packed"), packed)
    self.assertAlmostEqual(s.memory_saving,
                           4 * (BINARY_PARAMS + REAL_PARAMS + 2 * BN_CHANNELS) / packed)
    self.assertGreater(s.memory_saving, 29.0)

  def test_resnet18_rows(self):
    rows = {r.path: r for r in self.r18.layers}
    self.assertEqual(list(rows)[:3], ["stem_conv", "stem_bn", "stage1_block1/conv1"])
    self.assertEqual(list(rows)[-2:], ["head_bn", "fc"])
    conv = rows["stage3_block1/conv2"]
    self.assertEqual((conv.kind, conv.kernel_bits, conv.params, conv.output_shape),
                     ("BinaryConv", 1, 3 * 3 * 256 * 256, (2, 8, 8, 256)))
    self.assertEqual((conv.binary_macs, conv.real_macs), (8 * 8 * 3 * 3 * 256 * 256, 0))
    self.assertEqual(conv.memory_packed, 3 * 3 * 256 * 256 // 8)
    stem = rows["stem_conv"]
    self.assertEqual((stem.kernel_bits, stem.binary_macs, stem.real_macs),
                     (32, 0, 32 * 32 * 27 * 64))
    bn = rows["stage4_block1/downsample_bn"]
    self.assertEqual((bn.kernel_bits, bn.params, bn.batch_stats), (None, 1024, 1024))
    self.assertEqual(rows["fc"].real_macs, 5120)

  def test_real_downsample_and_fp_twin(self):
    realds = summary.summarize(models.get_model("resnet18_realds"), X, train=False)
    self.assertEqual(realds.total("binary_params"), BINARY_PARAMS - DOWNSAMPLE_K)
    self.assertEqual(realds.total("binary_macs"), BINARY_MACS - DOWNSAMPLE_MACS)
    self.assertEqual(realds.total("real_macs"), REAL_MACS + DOWNSAMPLE_MACS)
    fp = summary.summarize(models.get_model("resnet18_fp"), X, train=False)
    self.assertEqual((fp.total("binary_params"), fp.total("binary_macs")), (0, 0))
    self.assertEqual(fp.total("real_macs"), BINARY_MACS + REAL_MACS)
    self.assertEqual(fp.memory_saving, 1.0)

  def test_binary_weights_with_real_inputs_are_real_macs(self):
    layer = layers.BinaryConv(8, (3, 3), input_quantizer="identity", kernel_quantizer="xnor_weight")
    (row,) = summary.summarize(layer, jax.ShapeDtypeStruct((1, 4, 4, 2), jnp.float32)).layers
    self.assertEqual((row.kernel_bits, row.binary_params), (1, 3 * 3 * 2 * 8))
    self.assertEqual((row.binary_macs, row.real_macs), (0, 4 * 4 * 3 * 3 * 2 * 8))

  def test_owned_quantizer_params_are_32_bit(self):
    s = summary.summarize(models.get_model("resnet20_sdbnn"), X, train=False)
    rows = {r.path: r for r in s.layers}
    conv = rows["stage3_block2/conv1"]
    self.assertEqual((conv.params, conv.binary_params), (3 * 3 * 64 * 64 + 64, 3 * 3 * 64 * 64))
    self.assertEqual(conv.memory_packed, 3 * 3 * 64 * 64 // 8 + 4 * 64)
    # The ASD branch before it: two bias-free dense layers, 64 -> 4 -> 64.
    self.assertEqual(rows["stage3_block2/conv1/input_shift/fc1"].params, 64 * 4)
    self.assertEqual(list(rows).index("stage3_block2/conv1"),
                     list(rows).index("stage3_block2/conv1/input_shift/fc1") - 1)

  def test_print_summary(self):
    lines = []
    s = summary.print_summary(models.get_model("vgg_small"), X, print_fn=lines.append,
                              train=False)
    (text,) = lines
    self.assertIn("conv5", text)
    self.assertIn("BinaryConv", text)
    self.assertIn(f"{s.total('binary_macs'):,}", text)
    self.assertIn(f"{s.memory_saving:.2f}x smaller", text)
    self.assertEqual(text, summary.format_summary(s))
