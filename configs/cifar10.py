r"""CIFAR-10, ResNet-18 1w1a (IR-Net quantizers) with CMIM.

  python -m cmim_jax.main --config configs/cifar10.py --workdir runs/cifar10

Arguments: ``:smoke`` (one-minute CPU run), ``:cpu`` (the CPU-budget study of
the README: ResNet-20, train[:45000] / train[45000:]). It finds CIFAR-10
through ``data.data_dir`` (or tfds' default directory, or the data cache),
and otherwise downloads the archive into the data cache (``data.download``), e.g.

  python -m cmim_jax.main --config configs/cifar10.py:cpu --workdir runs/c10cpu \
      --config.data.data_dir=~/data/cifar-10-python.tar.gz
"""

from cmim_jax import default_config


def get_config(variant: str = ""):
  config = default_config.get_config()
  config.data.name = "cifar10"
  config.data.download = True  # Fetch the archive into the data cache if absent.
  if variant == "cpu":
    config.data.train_split = "train[:45000]"
    config.data.eval_split = "train[45000:]"
    config.model.name = "resnet20"
    config.batch_size = 64
    config.num_train_steps = 2000
    config.learning_rate = 0.05
    config.log_every_steps = 50
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 500
    return config
  return default_config.apply_variant(config, variant)
