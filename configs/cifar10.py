r"""CIFAR-10, ResNet-18 1w1a (IR-Net quantizers) with CMIM.

  python -m cmim_jax.main --config configs/cifar10.py --workdir runs/cifar10

Arguments: ``:smoke`` (one-minute CPU run), ``:cpu`` (the CPU-budget study of
the README: ResNet-20 on ../shared/data, train[:45000] / train[45000:]).
"""

from configs import default


def get_config(variant: str = ""):
  config = default.get_config()
  config.data.name = "cifar10"
  if variant == "cpu":
    config.data.source = "folder"
    config.data.data_dir = "../shared/data/cifar10-train.tar.gz"
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
  return default.apply_variant(config, variant)
