"""torchvision-layout ResNets (cmim_jax.models.tv_resnet) against torchvision.

The same random weights (BatchNorm statistics and affines included) go into
torchvision's model and, through ``from_torchvision_state_dict``, into ours;
logits and penultimate features (what ``train._apply`` taps for the KD/CRD
terms) must agree in float64, in eval and train mode. Skips without torch or
torchvision.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmim_jax import layers, models, train
from cmim_jax.models import tv_resnet
from torch_twins import parity

KEY = jax.random.key(0, impl="rbg")
NAMES = ("tv_resnet18", "tv_resnet34", "tv_resnet50")
FAST_COMPILE = parity.FAST_COMPILE


def _torchvision_resnet():
  pytest.importorskip("torch", reason="the parity test needs torch")
  from torch_twins import torchvision_models  # pylint: disable=g-import-not-at-top
  try:
    return torchvision_models.resnet_module()
  except ImportError:
    pytest.skip("the parity test needs torchvision (the [bench] extra)")


def _randomize(net, seed):
  """Generic values for every parameter and BN statistic (torchvision's
  init has zero BN biases, unit running variances and so on)."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in list(net.named_parameters()) + list(net.named_buffers()):
      if name.endswith("num_batches_tracked"):
        continue
      if name.endswith("running_var"):
        t.copy_(0.5 + 1.5 * torch.rand(t.shape, generator=g, dtype=t.dtype))
      elif t.ndim == 1:  # BN scale/bias/mean, fc bias
        t.copy_((1.0 if name.endswith("weight") else 0.0)
                + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype))
      else:  # conv and fc kernels, fan-in scaled
        t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype)
                * (2.0 / np.prod(t.shape[1:])) ** 0.5)


_flat = parity.flat


@pytest.mark.parametrize("name,expected", [
    ("tv_resnet18", 11_689_512), ("tv_resnet34", 21_797_672), ("tv_resnet50", 25_557_032)])
def test_param_count_is_torchvisions(name, expected):
  # torchvision's model cards list these counts (IMAGENET1K_V1 weights).
  shapes = jax.eval_shape(lambda x: models.get_model(name).init(KEY, x, train=False),
                          jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"])) == expected
  assert layers.BINARY_ACTS not in shapes  # full precision: nothing sown


def test_unknown_keys_are_listed():
  with pytest.raises(ValueError, match=r"'encoder_q\.conv1\.weight'.*'fc\.0\.weight'"):
    tv_resnet.from_torchvision_state_dict({"encoder_q.conv1.weight": np.zeros((64, 3, 7, 7)),
                                           "layer1.0.conv1.weight": np.zeros((64, 64, 3, 3)),
                                           "fc.0.weight": np.zeros((2, 2))})


def test_names_map_to_blocks():
  rng = np.random.default_rng(0)
  sd = {"module.layer3.4.conv2.weight": rng.normal(size=(256, 256, 3, 3)),
        "layer2.0.downsample.0.weight": rng.normal(size=(128, 64, 1, 1)),
        "layer2.0.downsample.1.running_var": rng.uniform(size=(128,)),
        "layer2.0.downsample.1.num_batches_tracked": np.array(3),
        "bn1.bias": rng.normal(size=(64,)), "fc.weight": rng.normal(size=(1000, 512))}
  v = tv_resnet.from_torchvision_state_dict(sd)
  np.testing.assert_array_equal(v["params"]["stage3_block5"]["conv2"]["kernel"],
                                sd["module.layer3.4.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["params"]["stage2_block1"]["downsample"]["kernel"],
                                sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["batch_stats"]["stage2_block1"]["downsample_bn"]["var"],
                                sd["layer2.0.downsample.1.running_var"])
  np.testing.assert_array_equal(v["params"]["stem_bn"]["bias"], sd["bn1.bias"])
  np.testing.assert_array_equal(v["params"]["fc"]["kernel"], sd["fc.weight"].T)


@pytest.mark.parametrize("name", NAMES)
def test_equals_torchvision(name):
  """Logits and penultimate features, eval and train mode, float64, on
  2 x 64 x 64 images (stage 4 is 2x2, so train-mode BN has 8 values)."""
  resnet = _torchvision_resnet()
  import torch  # pylint: disable=g-import-not-at-top
  num_classes = 10
  net = getattr(resnet, name[len("tv_"):])(num_classes=num_classes).to(torch.float64)
  _randomize(net, seed=len(name))
  state = {k: v.numpy().copy() for k, v in net.state_dict().items()}
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3))
  x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  captured = {}
  net.fc.register_forward_pre_hook(lambda m, inp: captured.__setitem__(m.training, inp[0]))
  with torch.no_grad():
    want = {False: net.eval()(x_t).numpy(), True: net.train()(x_t).numpy()}
  want_features = {k: v.numpy() for k, v in captured.items()}

  model = models.get_model(name, num_classes=num_classes, dtype=jnp.float64)
  with jax.enable_x64(True):
    variables = jax.tree.map(jnp.asarray, tv_resnet.from_torchvision_state_dict(state))
    init = jax.eval_shape(lambda x: model.init(KEY, x, train=False),
                          jax.ShapeDtypeStruct(x.shape, jnp.float64))
    for col in ("params", "batch_stats"):  # the converted tree is exactly the model's
      assert (jax.tree.map(lambda a: a.shape, variables[col])
              == jax.tree.map(lambda a: a.shape, init[col])), col

    def run(variables, x):
      eval_out = train._apply(model, variables, x, features=True,  # pylint: disable=protected-access
                              train=False)
      (logits, _), features = train._apply(  # pylint: disable=protected-access
          model, variables, x, features=True, train=True, mutable=["batch_stats"])
      return eval_out, (logits, features)

    x_j = jnp.asarray(x)
    out = jax.jit(run).lower(variables, x_j).compile(FAST_COMPILE)(variables, x_j)
  for mode, (logits, features) in zip((False, True), out):
    assert features.dtype == jnp.float64
    for got, ref, what in ((logits, want[mode], "logits"),
                           (features, want_features[mode], "features")):
      np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-7,
                                 atol=1e-7 * np.abs(ref).max(), err_msg=f"{what} train={mode}")
  # The weights matter: a second draw gives other logits.
  assert np.abs(want[False] - want[True]).max() > 1e-3

