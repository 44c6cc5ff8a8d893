r"""CIFAR-100, ResNet-18 1w1a with CMIM: the paper's CIFAR-100 recipe.

  python -m cmim_jax.main --config configs/cifar100.py --workdir runs/cifar100

IR-Net quantizers (Libra-PB weights, EDE with t from 1e-2 to 10), CMIM weight
3.2 at temperature 0.1 on the last binary layer of each of the last three
stages, SGD lr 0.1 momentum 0.9 wd 1e-4, cosine over 400 epochs. The official
code uses batch 100; we use 128 so that it splits over 8 devices.
``:smoke`` shrinks it to a one-minute CPU run.
"""

from cmim_jax import default_config


def get_config(variant: str = ""):
  config = default_config.get_config()
  config.data.name = "cifar100"
  config.data.download = True  # Fetch the archive into the data cache if absent.
  config.model.name = "resnet18"
  config.cmim.weight = 3.2
  config.cmim.temperature = 0.1
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.num_epochs = 400.0
  config.decay_kernels_only = False  # The official code decays every parameter.
  return default_config.apply_variant(config, variant)
