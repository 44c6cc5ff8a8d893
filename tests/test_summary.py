"""Tests for cmim_jax.summary against hand counts and the PyTorch twin's counts."""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from absl.testing import parameterized

from cmim_jax import binarize, layers, models, summary

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


def torch_twin_counts(name):
  """Counts of the PyTorch twin (bench/torch_bnn.py), an independent build of
  the same network: parameters and BN buffers from torch, MACs from forward
  hooks (output positions x weight size for every conv, in x out for linear)."""
  torch = pytest.importorskip("torch")
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "bench"))
  import torch_bnn  # pylint: disable=g-import-not-at-top
  net = torch_bnn.get_model(name).eval()
  counts = dict(params=torch_bnn.num_params(net), binary_params=0, batch_stats=0,
                binary_macs=0, real_macs=0)
  for m in net.modules():
    if isinstance(m, torch_bnn.BinaryConv2d):
      counts["binary_params"] += m.weight.numel()
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
      counts["batch_stats"] += m.running_mean.numel() + m.running_var.numel()

  def hook(m, _, out):
    positions = out[0, 0].numel() if out.ndim == 4 else 1
    key = "binary_macs" if isinstance(m, torch_bnn.BinaryConv2d) else "real_macs"
    counts[key] += positions * m.weight.numel()

  handles = [m.register_forward_hook(hook) for m in net.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
  with torch.no_grad():
    net(torch.zeros(1, 3, 32, 32))
  for h in handles:
    h.remove()
  return counts


class TorchTwinTest(parameterized.TestCase):

  @parameterized.parameters("resnet18", "resnet20")
  def test_totals_match_the_torch_twin(self, name):
    s = summary.summarize(models.get_model(name), X, train=False)
    want = torch_twin_counts(name)
    self.assertEqual({k: s.total(k) for k in want}, want)
    self.assertGreater(want["binary_macs"], 0)


class UserLayerTest(parameterized.TestCase):
  """A user's own quantizer and binary layer count as binary."""

  def setUp(self):
    super().setUp()

    @binarize.register("user_sign_for_summary")
    def user_sign(w, scale=1.0):
      return scale * binarize.sign(w)

    self.addCleanup(binarize._REGISTRY.pop, "user_sign_for_summary")  # pylint: disable=protected-access

  def test_user_layers(self):

    class SowingDense(nn.Module):
      """Binary inputs (it sows the taps), kernel quantized by a user quantizer."""
      features: int
      kernel_quantizer: str = "user_sign_for_summary(scale=0.5)"
      sow_taps: bool = True

      @nn.compact
      def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        x_b = binarize.sign(x)
        if self.sow_taps:
          self.sow(layers.BINARY_ACTS, "a_F", x)
          self.sow(layers.BINARY_ACTS, "a_B", x_b)
        return x_b @ binarize.get(self.kernel_quantizer)(w)

    class Net(nn.Module):

      @nn.compact
      def __call__(self, x):
        x = SowingDense(6, name="both")(x)                                 # binary x binary
        x = SowingDense(5, kernel_quantizer="identity", name="inputs_only")(x)
        x = SowingDense(4, sow_taps=False, name="kernel_only")(x)           # 1-bit weights
        return nn.Dense(3, name="fc")(x)

    rows = {r.path: r for r in summary.summarize(
        Net(), jax.ShapeDtypeStruct((2, 7), jnp.float32)).layers}
    self.assertEqual(
        {p: (r.kernel_bits, r.binary_params, r.binary_macs, r.real_macs)
         for p, r in rows.items()},
        {"both": (1, 7 * 6, 7 * 6, 0), "inputs_only": (32, 0, 0, 6 * 5),
         "kernel_only": (1, 5 * 4, 0, 5 * 4), "fc": (32, 0, 0, 4 * 3)})
    self.assertEqual(rows["fc"].params, 4 * 3 + 3)
