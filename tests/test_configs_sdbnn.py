"""SD-BNN's CIFAR-10 recipe configs: the official trainers' values, valid configs, buildable models."""

import jax
import jax.numpy as jnp
import pytest

from cmim_jax import models
from cmim_jax import train
from configs import sdbnn_cifar10

# From pingxue-hfut/SD-BNN cifar10/{ResNet20,ResNet18}/trainer.py and
# cifar10/VGG-Small/main.py (argparse defaults and T_min/T_max), written out
# here rather than read from the config under test.
OFFICIAL = {
    "resnet20": dict(lr=0.11, epochs=500, t_min=1e-3),
    "vgg_small": dict(lr=0.08, epochs=400, t_min=1e-1),
    "resnet18": dict(lr=0.08, epochs=600, t_min=1e-3),
}


@pytest.mark.parametrize("model", sorted(OFFICIAL))
def test_recipe_matches_the_official_trainer(model):
  config = sdbnn_cifar10.get_config(model)
  train.validate_config(config)
  want = OFFICIAL[model]
  assert config.model.name == f"{model}_sdbnn"
  assert (config.learning_rate, config.num_epochs) == (want["lr"], want["epochs"])
  assert (config.ede.t_min, config.ede.t_max) == (want["t_min"], 10.0)
  assert (config.optimizer, config.momentum, config.weight_decay) == ("sgd", 0.9, 1e-4)
  assert (config.batch_size, config.lr_schedule, config.decay_kernels_only) == (128, "cosine", False)
  assert config.objectives == "ce" and config.cmim.weight == 0.0


@pytest.mark.parametrize("arg", ["resnet20,smoke", "vgg_small,smoke", "resnet18,smoke"])
def test_smoke_variants_build_an_sdbnn_model(arg):
  config = sdbnn_cifar10.get_config(arg)
  train.validate_config(config)
  assert config.model.name.endswith("_sdbnn") and config.num_train_steps == 20
  model = models.from_config(config.model, num_classes=10)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), jnp.zeros((1, 32, 32, 3)))
  assert "params" in shapes


def test_unknown_recipe_names_the_known_ones():
  with pytest.raises(ValueError, match="resnet20, vgg_small, resnet18"):
    sdbnn_cifar10.get_config("resnet56")
