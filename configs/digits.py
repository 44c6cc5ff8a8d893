r"""The offline demo: a BNN with CMIM on scikit-learn's bundled digits (8x8).

  python -m cmim_jax.main --config configs/digits.py --workdir runs/digits_demo

(``make demo`` runs exactly this.) No download: the 1,797 images ship inside
scikit-learn. ResNet-20 1w1a (binary convs with IR-Net quantizers, real stem
and classifier), CMIM on, Adam. ``:smoke`` shrinks it further.
"""

from cmim_jax import default_config


def get_config(variant: str = ""):
  config = default_config.get_config()
  config.data.name = "digits"
  config.data.source = "digits"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.augment = "none"
  config.model.name = "resnet20"
  config.cmim.weight = 1.0
  config.batch_size = 64
  config.num_epochs = 100.0
  config.optimizer = "adam"
  config.learning_rate = 3e-3
  config.weight_decay = 0.0
  config.warmup_epochs = 1.0
  config.log_every_steps = 50
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  if variant == "smoke":
    config.num_epochs = 2.0
    config.num_train_steps = -1
    config.log_every_steps = 10
    return config
  return default_config.apply_variant(config, variant)
