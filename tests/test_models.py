"""Tests for cmim_jax.models: parameter counts, sown paths, binary inputs/kernels."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import traverse_util

from cmim_jax import binarize, layers, models, summary

# XLA:CPU compiles threefry slowly (seconds per shape); rbg keys compile fast.
KEY = jax.random.key(0, impl="rbg")


def normal(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
X32 = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)


def conv(k, cin, cout):
  return k * k * cin * cout


def bn(c):
  return 2 * c  # scale and bias (running statistics are batch_stats)


# ResNet-18, CMIM layout, written out block by block.
RESNET18 = (
    conv(3, 3, 64) + bn(64)                                          # stem
    + 2 * (2 * conv(3, 64, 64) + 2 * bn(64))                         # stage 1
    + conv(3, 64, 128) + conv(3, 128, 128) + 2 * bn(128)             # stage 2
    + conv(1, 64, 128) + bn(128) + 2 * conv(3, 128, 128) + 2 * bn(128)
    + conv(3, 128, 256) + conv(3, 256, 256) + 2 * bn(256)            # stage 3
    + conv(1, 128, 256) + bn(256) + 2 * conv(3, 256, 256) + 2 * bn(256)
    + conv(3, 256, 512) + conv(3, 512, 512) + 2 * bn(512)            # stage 4
    + conv(1, 256, 512) + bn(512) + 2 * conv(3, 512, 512) + 2 * bn(512)
    + bn(512) + 512 * 10 + 10)                                       # head
# ResNet-20: option-A shortcuts have no weights.
RESNET20 = (
    conv(3, 3, 16) + bn(16)
    + 3 * (2 * conv(3, 16, 16) + 2 * bn(16))
    + conv(3, 16, 32) + conv(3, 32, 32) + 2 * bn(32) + 2 * (2 * conv(3, 32, 32) + 2 * bn(32))
    + conv(3, 32, 64) + conv(3, 64, 64) + 2 * bn(64) + 2 * (2 * conv(3, 64, 64) + 2 * bn(64))
    + bn(64) + 64 * 10 + 10)
VGG_SMALL = (
    conv(3, 3, 128) + conv(3, 128, 128) + conv(3, 128, 256) + conv(3, 256, 256)
    + conv(3, 256, 512) + conv(3, 512, 512)
    + bn(128) * 2 + bn(256) * 2 + bn(512) * 2
    + 4 * 4 * 512 * 10 + 10)


def asd(cin):  # two bias-free dense layers, hidden max(cin // 16, 1)
  return 2 * cin * max(cin // 16, 1)


# SD-BNN adds, per binary conv of input cin and output cout: WSD's a (cout)
# and ASD (asd(cin)). ResNet-18 SD-BNN has FP downsampling.
SDBNN_EXTRA = {
    "resnet18_sdbnn": (4 * (64 + asd(64))
                       + (128 + asd(64)) + 3 * (128 + asd(128))
                       + (256 + asd(128)) + 3 * (256 + asd(256))
                       + (512 + asd(256)) + 3 * (512 + asd(512))),
    "resnet20_sdbnn": (6 * (16 + asd(16))
                       + (32 + asd(16)) + 5 * (32 + asd(32))
                       + (64 + asd(32)) + 5 * (64 + asd(64))),
    "vgg_small_sdbnn": sum(c + asd(cin) for cin, c in
                           ((128, 128), (128, 256), (256, 256), (256, 512), (512, 512))),
}
EXPECTED_PARAMS = {
    "resnet18": RESNET18, "resnet18_fp": RESNET18, "resnet18_realds": RESNET18,
    "resnet18_realds_fp": RESNET18,
    "resnet18_sdbnn": RESNET18 + SDBNN_EXTRA["resnet18_sdbnn"],
    "resnet20": RESNET20, "resnet20_fp": RESNET20,
    "resnet20_sdbnn": RESNET20 + SDBNN_EXTRA["resnet20_sdbnn"],
    "vgg_small": VGG_SMALL, "vgg_small_fp": VGG_SMALL,
    "vgg_small_sdbnn": VGG_SMALL + SDBNN_EXTRA["vgg_small_sdbnn"],
    # ImageNet Bi-Real ResNet-18 (1000 classes); hand count in test_models_imagenet.py.
    "birealnet18": 11_689_512, "birealnet18_fp": 11_689_512,
    "birealnet18_clipped": 11_689_512,
    # ReActNet adds RSign's beta (c_in) and RPReLU's gamma, slope, zeta (3 c_out)
    # to each of the 16 binary convs (hand count in test_models_reactnet.py).
    "reactnet18": 11_689_512 + sum(cin + 3 * cout for cin, cout in (
        [(64, 64)] * 4 + [(64, 128)] + [(128, 128)] * 3 + [(128, 256)] + [(256, 256)] * 3
        + [(256, 512)] + [(512, 512)] * 3)),
}
EXPECTED_PARAMS["reactnet18_fp"] = EXPECTED_PARAMS["reactnet18"]
# torchvision's resnet18/34/50 (1000 classes), as its model docs list them;
# tests/test_models_tv_resnet.py also counts the torchvision modules.
# SD-BNN ImageNet: ASD (c_in -> c_in/8 -> c_in), WSD's a and PReLU's slope
# (c_out each) per binary unit (hand count in test_models_sdbnn_imagenet.py).
EXPECTED_PARAMS["birealnet18_sdbnn"] = 11_689_512 + sum(2 * ci * (ci // 8) + 2 * co for ci, co in (
    [(64, 64)] * 4 + [(64, 128)] + [(128, 128)] * 3 + [(128, 256)] + [(256, 256)] * 3
    + [(256, 512)] + [(512, 512)] * 3))
EXPECTED_PARAMS.update(tv_resnet18=11_689_512, tv_resnet34=21_797_672, tv_resnet50=25_557_032)
# ReActNet-A (hand count in test_models_reactnet_a.py): 1000 classes at 224,
# 10 for the CIFAR variant; the FP twins have the same parameters.
EXPECTED_PARAMS.update(reactnet_a=29_343_592, reactnet_a_fp=29_343_592,
                       reactnet_a_cifar=28_328_842, reactnet_a_cifar_fp=28_328_842)
# MoCo v2's ResNet-50: torchvision's with fc -> Linear(2048, 2048), ReLU,
# Linear(2048, 128) (tests/test_moco_convert.py).
EXPECTED_PARAMS["tv_resnet50_moco"] = 27_966_656

RESNET18_BINARY = [f"stage{s}_block{b}/conv{c}" for s in (1, 2, 3, 4) for b in (1, 2)
                   for c in (1, 2)]
RESNET18_BINARY += [f"stage{s}_block1/downsample" for s in (2, 3, 4)]
RESNET20_BINARY = [f"stage{s}_block{b}/conv{c}" for s in (1, 2, 3) for b in (1, 2, 3)
                   for c in (1, 2)]
VGG_BINARY = [f"conv{i}" for i in range(1, 6)]


def n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def shapes(name, **kwargs):
  """Variable shapes of ``name`` on 2 CIFAR images (traced, not computed)."""
  return jax.eval_shape(lambda x: models.get_model(name, **kwargs).init(KEY, x, train=False), X32)


def fake_variables(name, seed=0, shape_tree=None, **kwargs):
  """Random params and unit BN statistics filled in numpy.

  Compiling ``model.init`` costs far more on a small CPU than the tests below;
  the values only need to be generic (random kernels, identity-ish BN).
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    leaf = path[-1].key
    if leaf in ("scale", "var"):
      return np.ones(s.shape, s.dtype)
    if leaf in ("bias", "mean", "a"):
      return np.zeros(s.shape, s.dtype)
    return rng.normal(0.0, 0.5, s.shape).astype(s.dtype)

  variables = shapes(name, **kwargs) if shape_tree is None else shape_tree
  return {col: jax.tree_util.tree_map_with_path(fill, variables[col])
          for col in ("params", "batch_stats")}


def forward(model, variables, x, schedule=None):
  """Jitted forward pass: (logits, flat {'path/a_F': array} of sown activations)."""
  logits, state = jax.jit(lambda v, x, s: model.apply(
      v, x, train=False, schedule=s, mutable=[layers.BINARY_ACTS]))(variables, x, schedule)
  flat = traverse_util.flatten_dict(dict(state.get(layers.BINARY_ACTS, {})), sep="/")
  return logits, {k: v[0] for k, v in flat.items()}


class ModelShapeTest(parameterized.TestCase):

  def test_hand_counts_match_published_cifar_resnets(self):
    """The hand counts against counts published for the same layouts by others.

    kuangliu/pytorch-cifar's ResNet18 (same convs, BNs and fc, no head BN) has
    11,173,962 parameters; akamaster/pytorch_resnet_cifar10's resnet20 (option-A
    shortcuts, no head BN) has 269,722. Ours add the head BN's scale and bias.
    """
    self.assertEqual(RESNET18 - bn(512), 11_173_962)
    self.assertEqual(RESNET20 - bn(64), 269_722)

  @parameterized.parameters(*models.MODEL_NAMES)
  def test_param_count(self, name):
    variables = shapes(name)
    self.assertEqual(n_params(variables["params"]), EXPECTED_PARAMS[name])
    self.assertEqual(set(variables) - {layers.BINARY_ACTS}, {"params", "batch_stats"})

  @parameterized.parameters(("resnet18", RESNET18_BINARY), ("resnet20", RESNET20_BINARY),
                            ("vgg_small", VGG_BINARY),
                            ("resnet18_realds", [p for p in RESNET18_BINARY
                                                 if "downsample" not in p]))
  def test_sown_paths(self, name, expected):
    paths = traverse_util.flatten_dict(dict(shapes(name)[layers.BINARY_ACTS]), sep="/")
    self.assertCountEqual(paths, [f"{p}/{a}" for p in expected for a in ("a_F", "a_B")])

  def test_downsample_kinds(self):
    binary = shapes("resnet18")["params"]["stage2_block1"]
    real = shapes("resnet18_realds")["params"]["stage2_block1"]
    chex.assert_shape([binary["downsample"]["kernel"], real["downsample"]["kernel"]],
                      (1, 1, 64, 128))
    self.assertNotIn("downsample", shapes("resnet20")["params"]["stage2_block1"])

  def test_get_model_passes_kwargs(self):
    model = models.get_model("resnet20", num_classes=100, bn_axis_name="data",
                             kernel_quantizer="xnor_weight")
    self.assertEqual((model.num_classes, model.bn_axis_name, model.kernel_quantizer),
                     (100, "data", "xnor_weight"))
    self.assertEqual(model.input_quantizer, "ede_sign")
    out = jax.eval_shape(lambda x: model.init_with_output(KEY, x, train=False)[0], X32)
    chex.assert_shape(out, (2, 100))
    chex.assert_type(out, jnp.float32)

  def test_unknown_model(self):
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18.*vgg_small"):
      models.get_model("resnet19")

  def test_unknown_shortcut(self):
    with pytest.raises(ValueError, match="unknown shortcut 'conv'"):
      jax.eval_shape(lambda x: models.get_model("resnet18", shortcut="conv").init(
          KEY, x, train=False), X32)

  def test_bfloat16_compute_float32_params_and_logits(self):
    model = models.get_model("vgg_small", dtype=jnp.bfloat16)
    variables, out = jax.eval_shape(
        lambda x: model.init_with_output(KEY, x, train=False)[::-1], X32)
    chex.assert_type(out, jnp.float32)
    self.assertEqual({np.dtype(a.dtype) for a in jax.tree.leaves(variables["params"])},
                     {np.dtype(np.float32)})
    chex.assert_type(variables[layers.BINARY_ACTS]["conv3"]["a_B"][0], jnp.bfloat16)


class BinaryForwardTest(parameterized.TestCase):

  @parameterized.parameters(("resnet18", RESNET18_BINARY), ("resnet20", RESNET20_BINARY),
                            ("vgg_small", VGG_BINARY))
  def test_binary_layers_see_pm1_and_use_pm_alpha_kernels(self, name, binary_paths):
    model = models.get_model(name)
    variables = fake_variables(name)
    x = normal((2, 32, 32, 3))
    logits, acts = forward(model, variables, x)
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite(logits)
    for path in binary_paths:
      a_b, a_f = np.asarray(acts[f"{path}/a_B"]), np.asarray(acts[f"{path}/a_F"])
      np.testing.assert_array_equal(np.abs(a_b), 1.0, err_msg=path)
      np.testing.assert_array_equal(a_b, np.where(a_f >= 0, 1.0, -1.0), err_msg=path)
      self.assertGreater(np.ptp(a_f), 0.0)  # a real-valued latent input
    # IR-Net effective kernels: one power-of-two magnitude per output channel.
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    kernels = jax.jit(lambda ks: {p: layers.effective_kernel(
        {"kernel": k}, model.kernel_quantizer, binarize.DEFAULT_SCHEDULE) for p, k in ks.items()})(
            {p: flat[f"{p}/kernel"] for p in binary_paths})
    for path in binary_paths:
      w_b = np.asarray(kernels[path])
      mags = np.abs(w_b).reshape(-1, w_b.shape[-1])
      np.testing.assert_array_equal(mags, np.broadcast_to(mags[:1], mags.shape), err_msg=path)
      np.testing.assert_array_equal(np.log2(mags[0]), np.round(np.log2(mags[0])))

  def test_xnor_model_kernels_are_pm_alpha(self):
    model = models.get_model("resnet20", kernel_quantizer="xnor_weight")
    rows = [r for r in summary.summarize(model, X32, train=False).layers
            if r.kind == "BinaryConv"]
    self.assertEqual([r.path for r in rows], RESNET20_BINARY)
    flat = traverse_util.flatten_dict(fake_variables("resnet20")["params"], sep="/")
    for r in rows:
      latent = np.asarray(flat[f"{r.path}/kernel"])
      w_b = np.asarray(layers.effective_kernel({"kernel": latent}, model.kernel_quantizer))
      alpha = np.abs(latent).reshape(-1, latent.shape[-1]).mean(0)
      np.testing.assert_allclose(w_b, np.where(latent >= 0, 1.0, -1.0) * alpha, rtol=1e-5)

  def test_fp_twins_sow_nothing(self):
    for name in models.MODEL_NAMES:
      full_precision = name.endswith("_fp") or name.startswith("tv_")  # tv_*: FP teachers
      self.assertEqual(full_precision, layers.BINARY_ACTS not in shapes(name), name)
    x = normal((2, 8, 8, 3))
    logits, acts = forward(models.get_model("resnet20_fp"), fake_variables("resnet20_fp"), x)
    self.assertEqual(acts, {})
    chex.assert_tree_all_finite(logits)


class TrainingBehaviourTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    # A narrow VGG-small on 8x8 images keeps compiles cheap.
    self.kwargs = dict(widths=(8, 8, 16, 16, 32, 32))
    self.model = models.get_model("vgg_small", **self.kwargs)
    self.x = normal((4, 8, 8, 3))
    variables = fake_variables(None, shape_tree=jax.eval_shape(
        lambda x: self.model.init(KEY, x, train=False), self.x))
    self.params, self.stats = variables["params"], variables["batch_stats"]

  def loss(self, params, stats, x, schedule):
    logits, new = self.model.apply({"params": params, "batch_stats": stats}, x,
                                   train=True, schedule=schedule, mutable=["batch_stats"])
    return jnp.sum(logits ** 2), new["batch_stats"]

  def test_schedule_change_does_not_retrace_and_changes_grads(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def grads(params, schedule):
      return jax.grad(self.loss, has_aux=True)(params, self.stats, self.x, schedule)

    out = [grads(self.params, dict(zip("kt", binarize.ede_schedule(jnp.float32(p)))))
           for p in (0.0, 0.5, 1.0)]
    g0, g1 = out[0][0]["conv3"]["kernel"], out[2][0]["conv3"]["kernel"]
    self.assertFalse(np.allclose(np.asarray(g0), np.asarray(g1)))
    chex.assert_tree_all_finite(out)
    # train=True updated the running statistics.
    self.assertFalse(np.allclose(np.asarray(out[0][1]["bn1"]["mean"]), 0.0))

  def test_schedule_does_not_change_the_forward_pass(self):
    variables = {"params": self.params, "batch_stats": self.stats}
    sched = dict(zip("kt", binarize.ede_schedule(jnp.float32(0.3))))
    apply = jax.jit(lambda s: self.model.apply(variables, self.x, train=False, schedule=s))
    np.testing.assert_array_equal(np.asarray(apply(None)), np.asarray(apply(sched)))

  def test_bn_axis_name_gives_global_batch_statistics(self):
    model = models.get_model("vgg_small", bn_axis_name="data", **self.kwargs)
    variables = {"params": self.params, "batch_stats": self.stats}

    def stats_of(m, x):
      return m.apply(variables, x, train=True, mutable=["batch_stats"])[1]["batch_stats"]

    shards = self.x.reshape(2, 2, 8, 8, 3)
    sharded = jax.jit(jax.vmap(lambda xs: stats_of(model, xs), axis_name="data"))(shards)
    # Row 0: the whole batch; row 1: the first shard alone (twice, same stats).
    plain = jax.jit(jax.vmap(lambda xs: stats_of(self.model, xs)))(
        jnp.stack([self.x, jnp.concatenate([shards[0], shards[0]])]))
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], sharded),
                                jax.tree.map(lambda a: a[0], plain), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(sharded["bn3"]["var"][0], sharded["bn3"]["var"][1])
    self.assertFalse(np.allclose(np.asarray(plain["bn3"]["var"][1]),
                                 np.asarray(plain["bn3"]["var"][0])))


# ---------------------------------------------------------------- protocol


def tiny_config(name):
  """A ``config.model`` section shrinking ``name`` to trace fast: 1-2 blocks
  per stage and 4-32 channels for the ResNets, 4-8 channels for VGG-small.
  Models of unknown layout keep their defaults."""
  config = models.config_section()
  config.name = name
  model = models.default_model(name)
  if isinstance(model, models.ResNet):
    n = len(model.stage_sizes)
    config.stage_sizes = (2,) + (1,) * (n - 1)  # two blocks in stage 1: names b = 1, 2
    config.widths = tuple(4 * 2 ** s for s in range(n))
  elif isinstance(model, models.VGGSmall):
    config.widths = (4, 4, 8, 8, 8, 8)
  elif isinstance(model, models.ReActNetA):
    # Doubling at stride 1 and 2, then keeping: every kind of block.
    config.widths = (4, 8, 16, 16)
    config.strides = (model.strides[0], 1, 2, 1)
  return config


def protocol_input(model):
  """ImageNet-stem models on one 32x32 image, the CIFAR ones on two 8x8 images."""
  if getattr(model, "stem", None) == "imagenet":
    return jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)


def expected_binary_layers(model):
  """The sown layer paths CONTRACTS.md names, or None where it names none."""
  if binarize.is_identity(model.input_quantizer):
    return set()
  if isinstance(model, models.ResNet):
    paths = {f"stage{s}_block{b}/conv{c}" for s, n in enumerate(model.stage_sizes, 1)
             for b in range(1, n + 1) for c in (1, 2)}
    if model.shortcut == "binary":
      paths |= {f"stage{s}_block1/downsample" for s in range(2, len(model.stage_sizes) + 1)}
    return paths
  if isinstance(model, models.VGGSmall):
    return {f"conv{i}" for i in range(1, len(model.widths))}
  if isinstance(model, models.ReActNetA):
    widths = model.widths
    return {f"block{i}/{c}" for i in range(1, len(widths))
            for c in (("conv1", "conv2_1", "conv2_2") if widths[i] != widths[i - 1]
                      else ("conv1", "conv2"))}
  return None


class ModelProtocolTest(parameterized.TestCase):
  """docs/CONTRACTS.md "Models", checked on every registered model by tracing
  (``jax.eval_shape``: nothing is compiled)."""

  @parameterized.parameters(*models.names())
  def test_protocol(self, name):
    model = models.from_config(tiny_config(name), num_classes=3)
    x = protocol_input(model)
    b = x.shape[0]
    variables = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
    self.assertContainsSubset({"params", "batch_stats"}, set(variables))
    variables = {k: variables[k] for k in ("params", "batch_stats")}
    schedule = {"k": jax.ShapeDtypeStruct((), jnp.float32),
                "t": jax.ShapeDtypeStruct((), jnp.float32)}

    # train= and schedule= accepted; logits float32 [B, num_classes].
    def train_apply(m, v, x, s):
      return m.apply(v, x, train=True, schedule=s,
                     mutable=["batch_stats", layers.BINARY_ACTS])

    logits, state = jax.eval_shape(functools.partial(train_apply, model), variables, x, schedule)
    # Embedding models (a MoCo teacher) return embed_dim wide outputs (CONTRACTS.md).
    chex.assert_shape(logits, (b, getattr(model, "embed_dim", 3)))
    chex.assert_type(logits, jnp.float32)
    self.assertEqual(jax.tree.structure(state["batch_stats"]),
                     jax.tree.structure(variables["batch_stats"]))

    # clone(bn_axis_name=) works and binds BatchNorm to the named batch axis.
    sharded = model.clone(bn_axis_name="data")
    self.assertEqual((sharded.bn_axis_name, model.bn_axis_name), ("data", None))
    per_device = jax.ShapeDtypeStruct((2,) + x.shape, x.dtype)
    out, _ = jax.eval_shape(jax.vmap(functools.partial(train_apply, sharded),
                                     in_axes=(None, 0, None), axis_name="data"),
                            variables, per_device, schedule)
    chex.assert_shape(out, (2, b, getattr(model, "embed_dim", 3)))
    if jax.tree.leaves(variables["batch_stats"]):
      with pytest.raises(NameError, match="data"):  # unbound axis: it is really used
        jax.eval_shape(functools.partial(train_apply, sharded), variables, x, schedule)

    # Sown taps: a_F and a_B at each binary layer, the same shape and dtype.
    sown = traverse_util.flatten_dict(dict(state.get(layers.BINARY_ACTS, {})), sep="/")
    by_layer = {}
    for path, value in sown.items():
      layer, leaf = path.rsplit("/", 1)
      by_layer.setdefault(layer, {})[leaf] = value
    for layer, leaves in by_layer.items():
      self.assertEqual(set(leaves), {"a_F", "a_B"}, layer)
      (a_f,), (a_b,) = leaves["a_F"], leaves["a_B"]
      self.assertEqual((a_f.shape, a_f.dtype), (a_b.shape, a_b.dtype), layer)
      self.assertEqual(a_f.shape[0], b, layer)
    expected = expected_binary_layers(model)
    if expected is not None:
      self.assertEqual(set(by_layer), expected)
    self.assertEqual(bool(by_layer), not binarize.is_identity(model.input_quantizer))

  @parameterized.parameters(*models.names())
  def test_unset_config_keeps_the_models_defaults(self, name):
    config = models.config_section()
    config.name = name
    self.assertEqual(models.from_config(config, num_classes=5, bn_axis_name="data"),
                     models.get_model(name, num_classes=5, bn_axis_name="data"))


class FromConfigTest(parameterized.TestCase):

  def config(self, name, **fields):
    config = models.config_section()
    config.name = name
    for key, value in fields.items():
      config[key] = value
    return config

  def test_every_field_settable(self):
    model = models.from_config(self.config(
        "resnet20", stage_sizes=[1, 2], widths=(8, 16), block_cls="BasicBlock",
        shortcut="real", stem="imagenet", stem_act=False, head_bn=False,
        input_quantizer="ste_sign(clip=1.5)", kernel_quantizer="xnor_weight",
        input_shift="ASD(reduction=4)", dtype="bfloat16"), num_classes=7)
    self.assertEqual(
        (model.stage_sizes, model.widths, model.block_cls, model.shortcut, model.stem,
         model.stem_act, model.head_bn, model.input_quantizer, model.kernel_quantizer,
         model.input_shift.keywords, model.dtype, model.num_classes),
        ((1, 2), (8, 16), models.BasicBlock, "real", "imagenet", False, False,
         "ste_sign(clip=1.5)", "xnor_weight", {"reduction": 4}, jnp.bfloat16, 7))
    # The fields reached the layers: the 'real' shortcut has an FP 1x1 conv with
    # no quantizer state, ASD shifts inputs, and 8 -> 16 channels.
    params = jax.eval_shape(lambda x: model.init(KEY, x, train=False),
                            jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))["params"]
    block = params["stage2_block1"]
    chex.assert_shape(block["downsample"]["kernel"], (1, 1, 8, 16))
    self.assertIn("input_shift", block["conv1"])
    self.assertIn("stage2_block2", params)
    self.assertNotIn("stage1_block2", params)
    self.assertNotIn("head_bn", params)
    self.assertIsNone(models.from_config(self.config("vgg_small_sdbnn", input_shift="none"),
                                         num_classes=10).input_shift)

  def test_inapplicable_field_names_field_and_model(self):
    with pytest.raises(ValueError, match=r"config.model.stage_sizes=\(1, 1\) does not apply "
                       r"to model 'vgg_small' \(VGGSmall\).*its fields: .*pool_after.*widths"):
      models.from_config(self.config("vgg_small", stage_sizes=(1, 1)), num_classes=10)
    with pytest.raises(ValueError, match="config.model.foo=1 .*'resnet20'"):
      models.from_config({"name": "resnet20", "foo": 1}, num_classes=10)

  @parameterized.parameters(
      (dict(stem_act=1), "stem_act=1.*expected a bool"),
      (dict(widths=16), "widths=16.*expected a tuple"),
      (dict(block_cls="Bottleneck"), "unknown part 'Bottleneck'.*BasicBlock, BiRealBlock"),
      (dict(dtype="float33"), "not a dtype name"),
      (dict(input_quantizer="ste_sign(clp=2)"), "no option 'clp'.*clip=1.0"),
      (dict(num_classes=3), "num_classes is set by the trainer"),
  )
  def test_bad_values(self, fields, message):
    with pytest.raises(ValueError, match=message):
      models.from_config({"name": "resnet20", **fields}, num_classes=10)

  def test_unknown_model_and_placeholder_types(self):
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18.*config.imports"):
      models.from_config({"name": "resnet19"}, num_classes=10)
    config = models.config_section()
    with pytest.raises(TypeError):  # typed placeholders catch CLI type slips
      config.stem_act = "yes"
    config.widths = [4, 8]
    self.assertEqual(config.widths, (4, 8))

  def test_register_and_import(self):
    self.assertNotIn("tiny_user_net", models.names())
    try:
      @models.register("tiny_user_net")
      class TinyUserNet(nn.Module):  # pylint: disable=unused-variable
        num_classes: int = 10
        bn_axis_name: str | None = None
        hidden: int = 4

        @nn.compact
        def __call__(self, x, *, train, schedule=None):
          return nn.Dense(self.num_classes)(nn.Dense(self.hidden)(x.reshape(len(x), -1)))

      with pytest.raises(ValueError, match="already registered"):
        models.register("tiny_user_net")(TinyUserNet)
      self.assertIn("hidden", models.config_section())
      model = models.from_config({"name": "tiny_user_net", "hidden": 6}, num_classes=3)
      self.assertEqual((model.hidden, model.num_classes), (6, 3))
    finally:
      models.registry._MODELS.pop("tiny_user_net", None)  # pylint: disable=protected-access
    with pytest.raises(ImportError, match="config.imports: cannot import 'no_such_mod_xyz'"):
      models.import_modules("json, no_such_mod_xyz")
