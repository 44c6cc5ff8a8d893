"""configs/cifar10.py: the 30-minute CPU recipe (:cpu) and the README study's values (:study)."""

import re

import pytest

from cmim_jax import train
from configs import cifar10


def test_cpu_recipe_is_valid_and_its_docstring_figures_hold():
  config = cifar10.get_config("cpu")
  train.validate_config(config)
  assert (config.data.train_split, config.data.eval_split) == ("train[:45000]", "train[45000:]")
  assert config.model.name == "resnet20" and config.objectives == "ce"
  # The docstring states steps, images and epochs; a change of the config must change them too.
  doc = " ".join(cifar10.__doc__.split())
  steps, images, epochs = re.search(
      r"cosine, ([\d,]+) steps \(([\d,]+) images, ([\d.]+) epochs", doc).groups()
  assert int(steps.replace(",", "")) == config.num_train_steps
  assert int(images.replace(",", "")) == config.num_train_steps * config.batch_size
  assert float(epochs) == round(config.num_train_steps * config.batch_size / 45000, 1)
  assert f"batch {config.batch_size}," in doc and f"lr {config.learning_rate:g}" in doc


def test_study_keeps_the_readme_study_values():
  # The README's "CIFAR-10 on a CPU budget" table was trained with these (written out here).
  config = cifar10.get_config("study")
  train.validate_config(config)
  assert (config.model.name, config.batch_size, config.num_train_steps) == ("resnet20", 64, 2000)
  assert (config.optimizer, config.learning_rate, config.lr_schedule) == ("sgd", 0.05, "cosine")
  assert config.objectives == "ce,cmim" and config.cmim.weight == 3.2
  assert (config.data.train_split, config.data.eval_split) == ("train[:45000]", "train[45000:]")


def test_unknown_argument_names_the_known_ones():
  with pytest.raises(ValueError, match="'smoke', 'cpu', 'study'"):
    cifar10.get_config("cpu_fast")
