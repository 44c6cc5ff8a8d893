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
import copy
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cmim_jax import binarize, layers, models
from cmim_jax.models import sdbnn_convert
from torch_twins import parity

KEY = jax.random.key(0, impl="rbg")
FAST_COMPILE = parity.FAST_COMPILE
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


def flat(tree):
  return traverse_util.flatten_dict(dict(tree), sep="/")


def _randomize(twin, seed):
  """Generic values everywhere: BN statistics and affines, WSD logits, ASD
  and FP weights fan-in scaled, and binary kernels whose filters have
  clearly nonzero means (WSD shifts by them)."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)

  def normal(shape, std, dtype=torch.float64):
    return torch.randn(shape, generator=g, dtype=dtype) * std

  with torch.no_grad():
    for name, t in list(twin.named_parameters()) + list(twin.named_buffers()):
      if name.endswith("num_batches_tracked"):
        continue
      if name.endswith("running_mean"):
        t.copy_(normal(t.shape, 0.2))
      elif name.endswith("running_var"):
        t.copy_(0.5 + 1.5 * torch.rand(t.shape, generator=g, dtype=t.dtype))
      elif name.endswith("alpha"):
        t.copy_(normal(t.shape, 1.0))
      elif t.ndim == 1:  # BN scale/bias, fc bias
        t.copy_((1.0 if name.endswith("weight") else 0.0) + normal(t.shape, 0.2))
      else:
        t.copy_(normal(t.shape, (2.0 / np.prod(t.shape[1:])) ** 0.5))
    for _, conv in twin.binary_convs():
      conv.weight.add_(normal((conv.weight.shape[0], 1, 1, 1), 0.5))


def _bn_counts(twin, x):
  """Elements per channel each BatchNorm normalises over, by name."""
  import torch  # pylint: disable=g-import-not-at-top
  counts, hooks = {}, []
  for name, mod in twin.named_modules():
    if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
      hooks.append(mod.register_forward_pre_hook(
          lambda m, inp, name=name: counts.__setitem__(name, inp[0].numel() // inp[0].shape[1])))
  with torch.no_grad():
    twin.eval()(x)
  for h in hooks:
    h.remove()
  return counts


def _library_path(name):
  """The library module of a twin's binary conv (``layer2.0.conv1``)."""
  m = re.fullmatch(r"layer(\d+)\.(\d+)\.(conv\d)", name)
  return f"stage{m.group(1)}_block{int(m.group(2)) + 1}/{m.group(3)}" if m else name


def _assert_tree_close(actual, expected, rtol, what):
  a, e = flat(actual), flat(expected)
  assert sorted(a) == sorted(e), what
  for k in e:
    ref = np.asarray(e[k])
    scale = max(float(np.max(np.abs(ref))), 1e-12)
    np.testing.assert_allclose(np.asarray(a[k]), ref, rtol=rtol, atol=rtol * scale,
                               err_msg=f"{what}: {k}")


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
  torch = pytest.importorskip("torch", reason="the PyTorch twin needs torch")
  convert = functools.partial(sdbnn_convert.from_official_state_dict, arch=arch)
  twin, state, model = _twin_and_model(arch, seed=0, narrow=True)
  rng = np.random.default_rng(1)
  x = rng.normal(size=X_SHAPE)
  x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  ct = rng.normal(size=(X_SHAPE[0], NUM_CLASSES))
  counts = _bn_counts(twin, x_t)

  with torch.no_grad():
    want_eval = twin.eval()(x_t).numpy()
  want_acts = {_library_path(n): (c.a_F.numpy(), c.a_B.numpy()) for n, c in twin.binary_convs()}
  train_twin = copy.deepcopy(twin).train()
  x_req = x_t.clone().requires_grad_(True)
  want_train = train_twin(x_req)
  (want_train * torch.from_numpy(ct)).sum().backward()
  want_train = want_train.detach().numpy()

  schedule = {"k": K, "t": T}
  logits, sown, (grads, grad_x), (train_logits, new_stats) = parity.flax_side(
      model, convert(state), x, ct, key=KEY, schedule=schedule)

  # The models return float32 logits.
  for got, want in ((logits, want_eval), (train_logits, want_train)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())

  # ASD's shifted input of each binary conv (eval mode) and its sign.
  sown = flat(sown[layers.BINARY_ACTS])
  assert len(sown) == 2 * len(want_acts)
  for path, (a_f, a_b) in want_acts.items():
    np.testing.assert_allclose(sown[f"{path}/a_F"][0], a_f.transpose(0, 2, 3, 1), rtol=1e-12,
                               atol=1e-12, err_msg=path)
    np.testing.assert_array_equal(sown[f"{path}/a_B"][0], a_b.transpose(0, 2, 3, 1))

  # Gradients of every parameter (WSD's a and ASD's weights included) and the
  # input. EDE's tanh runs in float32 in the library: 1e-5, not 1e-9.
  torch_grads = convert({n: p.grad.numpy() for n, p in train_twin.named_parameters()})
  _assert_tree_close(grads, torch_grads["params"], 1e-5, "param gradients")
  np.testing.assert_allclose(grad_x, x_req.grad.numpy().transpose(0, 2, 3, 1),
                             rtol=1e-5, atol=1e-5 * np.abs(grad_x).max())
  # Nonzero, so the comparison tests something. ASD's hidden layer has
  # C // 16 units (1 at 16 channels); where its ReLU is off for both samples,
  # that conv's ASD gets no gradient, in both implementations.
  dead = {k for k, g in flat(grads).items() if np.abs(g).max() == 0}
  assert all("/input_shift/" in k for k in dead), sorted(dead)
  assert len(dead) <= len(want_acts), sorted(dead)  # at least half the ASD kernels live

  # Running means match; running variances differ by the known convention:
  # PyTorch folds in the unbiased batch variance, Flax the biased one.
  new_t = {k: v.numpy() for k, v in train_twin.state_dict().items()}
  for k, v in state.items():
    if k.endswith("running_var"):
      n = counts[k[:-len(".running_var")]]
      new_t[k] = 0.9 * v + 0.1 * (new_t[k] - 0.9 * v) / 0.1 * (n - 1) / n
  _assert_tree_close(new_stats, convert(new_t)["batch_stats"], 1e-9, "batch_stats")


@pytest.mark.parametrize("arch", list(NARROW))
def test_registered_network_logits_equal_pytorch_twin(arch):
  """The registered network at its own widths and depth (eval logits)."""
  torch = pytest.importorskip("torch", reason="the PyTorch twin needs torch")
  twin, state, model = _twin_and_model(arch, seed=3, narrow=False)
  x = np.random.default_rng(2).normal(size=(1, 32, 32, 3))
  with torch.no_grad():
    want = twin.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  # As a DataParallel checkpoint names them (the official trainers save that).
  state = {f"module.{k}": v for k, v in state.items()}
  with jax.enable_x64(True):
    variables = jax.tree.map(jnp.asarray, sdbnn_convert.from_official_state_dict(state, arch))
    init_shapes = jax.eval_shape(lambda x: model.init(KEY, x, train=False),
                                 jax.ShapeDtypeStruct(x.shape, jnp.float64))
    for col in ("params", "batch_stats"):
      assert (jax.tree.map(lambda a: a.shape, variables[col])
              == jax.tree.map(lambda a: a.shape, init_shapes[col])), col
    got = jax.jit(functools.partial(model.apply, train=False)).lower(
        variables, jnp.asarray(x)).compile(FAST_COMPILE)(variables, jnp.asarray(x))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
