"""MoCo v2 checkpoints as teachers (cmim_jax.models.moco_convert, models.embedding).

The end-to-end test saves a randomly initialised torchvision ResNet-50 with
MoCo v2's MLP head in MoCo's checkpoint layout (torch.save of
``{'state_dict': {'module.encoder_q.*', 'module.encoder_k.*', 'module.queue',
...}}``), converts it with the command line into a teacher workdir, reads
that back the way ``config.teacher`` does, and compares the 128-d embedding
and the 2048-d features with PyTorch's. Skips without torch/torchvision.
"""
import copy
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmim_jax import models, teachers, train
from cmim_jax.models import embedding, moco_convert

KEY = jax.random.key(0, impl="rbg")
# torchvision resnet50 (25,557,032) with fc (2048 -> 1000) replaced by
# Linear(2048, 2048) -> ReLU -> Linear(2048, 128).
MOCO_R50 = 25_557_032 - (2048 * 1000 + 1000) + (2048 * 2048 + 2048) + (2048 * 128 + 128)


def n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def test_moco_r50_structure():
  model = models.get_model("tv_resnet50_moco", num_classes=1000)  # num_classes is unused
  v = jax.eval_shape(lambda x: model.init(KEY, x, train=False),
                     jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert n_params(v["params"]) == MOCO_R50 == 27_966_656
  chex.assert_shape(v["params"]["backbone"]["fc"]["kernel"], (2048, 2048))
  chex.assert_shape(v["params"]["proj"]["kernel"], (2048, 128))
  out, feats = jax.eval_shape(
      lambda v, x: train._apply(model, v, x, features=True, train=False), v,
      jax.ShapeDtypeStruct((3, 64, 64, 3), jnp.float32))
  chex.assert_shape([out, feats], [(3, 128), (3, 2048)])


def test_head_is_relu_between_backbone_fc_and_proj():
  # A small backbone: the wrapper's arithmetic, against numpy.
  model = embedding.MLPHeadNet(backbone="resnet20_fp", head_hidden=6, embed_dim=4)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)

  def run(x):
    v = model.init(KEY, x, train=False)
    z, feats = train._apply(model, v, x, features=True, train=False)
    return z, feats, v["params"]

  z, feats, p = jax.jit(run)(x)
  fc, proj = p["backbone"]["fc"], p["proj"]
  hidden = np.maximum(np.asarray(feats) @ fc["kernel"] + fc["bias"], 0)
  np.testing.assert_allclose(z, hidden @ proj["kernel"] + proj["bias"], rtol=1e-5, atol=1e-5)


def _fake_moco_sd(rng, head=True):
  sd = {"module.encoder_q.conv1.weight": rng.normal(size=(64, 3, 7, 7)),
        "module.encoder_q.bn1.running_mean": rng.normal(size=(64,)),
        "module.encoder_k.conv1.weight": rng.normal(size=(64, 3, 7, 7)),
        "module.queue": rng.normal(size=(128, 16)), "module.queue_ptr": np.zeros(1)}
  if head:
    sd.update({"module.encoder_q.fc.0.weight": rng.normal(size=(2048, 2048)),
               "module.encoder_q.fc.0.bias": rng.normal(size=(2048,)),
               "module.encoder_q.fc.2.weight": rng.normal(size=(128, 2048)),
               "module.encoder_q.fc.2.bias": rng.normal(size=(128,))})
  else:
    sd.update({"module.encoder_q.fc.weight": rng.normal(size=(128, 2048)),
               "module.encoder_q.fc.bias": rng.normal(size=(128,))})
  return sd


def test_names_map_and_key_encoder_is_dropped():
  rng = np.random.default_rng(0)
  sd = _fake_moco_sd(rng)
  v = moco_convert.from_moco_state_dict({"epoch": 800, "arch": "resnet50", "state_dict": sd})
  p = v["params"]
  np.testing.assert_array_equal(p["backbone"]["fc"]["kernel"], sd["module.encoder_q.fc.0.weight"].T)
  np.testing.assert_array_equal(p["proj"]["kernel"], sd["module.encoder_q.fc.2.weight"].T)
  np.testing.assert_array_equal(p["proj"]["bias"], sd["module.encoder_q.fc.2.bias"])
  np.testing.assert_array_equal(p["backbone"]["stem_conv"]["kernel"],
                                sd["module.encoder_q.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["batch_stats"]["backbone"]["stem_bn"]["mean"],
                                sd["module.encoder_q.bn1.running_mean"])
  assert sorted(p) == ["backbone", "proj"]


@pytest.mark.parametrize("sd,match", [
    ({"module.encoder_k.conv1.weight": np.zeros((1,))}, "no query encoder"),
    ({"module.encoder_q.fc.0.weight": np.zeros((1,)), "model.head": np.zeros((1,))},
     r"not parameters of a MoCo model.*model\.head"),
    ("v1", "linear head"),
    ({"module.encoder_q.fc.0.weight": np.zeros((1,))}, "MLP head"),
])
def test_bad_checkpoints_say_why(sd, match):
  if sd == "v1":
    sd = _fake_moco_sd(np.random.default_rng(0), head=False)
  with pytest.raises(ValueError, match=match):
    moco_convert.from_moco_state_dict(sd)


def test_workdir_refuses_mismatched_weights(tmp_path):
  v = jax.eval_shape(lambda x: models.get_model("tv_resnet50_moco").init(KEY, x, train=False),
                     jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  v = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), dict(v))
  v["params"]["proj"]["kernel"] = np.zeros((2048, 64), np.float32)
  with pytest.raises(ValueError, match=r"proj/kernel.*\(2048, 64\).*\(2048, 128\)"):
    moco_convert.write_teacher_workdir(v, str(tmp_path / "t"))


def _moco_encoder(torch, resnet_module):
  """MoCo v2's query encoder: torchvision resnet50(num_classes=128) whose fc
  becomes Linear(2048, 2048) -> ReLU -> fc, as moco/builder.py does."""
  net = resnet_module.resnet50(num_classes=128)
  net.fc = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), net.fc)
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():  # generic values: torchvision's init has unit variances, zero biases...
    for name, t in list(net.named_parameters()) + list(net.named_buffers()):
      if name.endswith("num_batches_tracked"):
        continue
      if name.endswith("running_var"):
        t.copy_(0.5 + torch.rand(t.shape, generator=g))
      elif t.ndim == 1:
        t.copy_((1.0 if name.endswith("weight") and "fc" not in name else 0.0)
                + 0.2 * torch.randn(t.shape, generator=g))
      else:
        t.copy_(torch.randn(t.shape, generator=g) * (1.0 / np.prod(t.shape[1:])) ** 0.5)
  return net.eval()


def test_converted_checkpoint_is_the_same_teacher(tmp_path):
  torch = pytest.importorskip("torch", reason="the MoCo checkpoint is written by torch")
  from torch_twins import torchvision_models  # pylint: disable=g-import-not-at-top
  try:
    resnet_module = torchvision_models.resnet_module()
  except ImportError:
    pytest.skip("needs torchvision (the [bench] extra)")
  encoder_q = _moco_encoder(torch, resnet_module)

  class MoCo(torch.nn.Module):  # the attribute names of moco/builder.py's MoCo
    def __init__(self):
      super().__init__()
      self.encoder_q, self.encoder_k = encoder_q, copy.deepcopy(encoder_q)
      self.register_buffer("queue", torch.randn(128, 64))
      self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

  moco = torch.nn.DataParallel(MoCo())  # the 'module.' prefix of MoCo's saves
  optimizer = torch.optim.SGD(moco.parameters(), lr=0.03, momentum=0.9)
  path = tmp_path / "checkpoint_0199.pth.tar"
  torch.save({"epoch": 200, "arch": "resnet50", "state_dict": moco.state_dict(),
              "optimizer": optimizer.state_dict()}, path)

  workdir = str(tmp_path / "teacher")
  assert moco_convert.main([str(path), "--out", workdir]) == 0

  # The trainer's own path for config.teacher=workdir (train.create_task,
  # train.load_teacher), with the parts of the task it reads.
  run_config, _ = teachers.load_run(workdir, "teacher")
  assert (run_config.model.name, run_config.data.name) == ("tv_resnet50_moco", "imagenet2012")
  teacher = teachers.build_model(run_config, num_classes=1000, data_name="imagenet2012")
  task = types.SimpleNamespace(teacher=teacher,
                               info=types.SimpleNamespace(image_shape=(64, 64, 3)))
  variables = train.load_teacher(types.SimpleNamespace(teacher=workdir), task)

  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  feats_t = []
  hook = encoder_q.avgpool.register_forward_hook(
      lambda m, i, o: feats_t.append(torch.flatten(o, 1)))
  with torch.no_grad():
    want = encoder_q.double()(torch.from_numpy(x.transpose(0, 3, 1, 2)).double()).numpy()
  hook.remove()
  want_feats = feats_t[0].numpy()

  z, feats = jax.jit(lambda v, x: train._apply(teacher, v, x, features=True, train=False))(
      variables, jnp.asarray(x))
  # float32 here against float64 there.
  np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  np.testing.assert_allclose(feats, want_feats, rtol=1e-4, atol=1e-4 * np.abs(want_feats).max())
