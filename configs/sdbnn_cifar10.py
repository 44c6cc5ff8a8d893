r"""SD-BNN's CIFAR-10 recipes (Xue et al. 2021; pingxue-hfut/SD-BNN), one per model.

  python -m cmim_jax.main --config configs/sdbnn_cifar10.py:resnet20 --workdir runs/sdbnn_r20
  python -m cmim_jax.main --config configs/sdbnn_cifar10.py:vgg_small --workdir runs/sdbnn_vgg
  python -m cmim_jax.main --config configs/sdbnn_cifar10.py:resnet18 --workdir runs/sdbnn_r18

Append ``,smoke`` (e.g. ``:resnet20,smoke``) for a one-minute CPU run.
The models are the ``*_sdbnn`` ones (activation and weight self-distribution
on IR-Net-style layers, EDE gradients, no scale factors), which match the
official CIFAR-10 models given the same weights. What the official trainers
set, and this config copies: SGD momentum 0.9, weight decay 1e-4 on every
parameter (``torch.optim.SGD(model.parameters(), ...)``), batch 128, cosine to
0 over the run, zero-padded 4-pixel crops and flips, no CMIM, and per model:

  model      lr    epochs  EDE t_min -> t_max   reported CIFAR-10 top-1
  resnet20   0.11  500     1e-3 -> 10           86.9
  vgg_small  0.08  400     1e-1 -> 10           90.8
  resnet18   0.08  600     1e-3 -> 10           92.5

The reported numbers are the paper's; this port has not been trained to them.
"""

from cmim_jax import default_config

# model name -> (learning rate, epochs, EDE t_min), from the official trainers.
RECIPES = {
    "resnet20": (0.11, 500.0, 1e-3),
    "vgg_small": (0.08, 400.0, 1e-1),
    "resnet18": (0.08, 600.0, 1e-3),
}


def get_config(arg: str = "resnet20"):
  model, _, variant = (arg or "resnet20").partition(",")
  if model not in RECIPES:
    raise ValueError(f"unknown SD-BNN recipe {model!r}; known: {', '.join(RECIPES)} "
                     "(e.g. --config configs/sdbnn_cifar10.py:vgg_small).")
  learning_rate, epochs, t_min = RECIPES[model]
  config = default_config.get_config()
  config.data.name = "cifar10"
  config.data.download = True  # Fetch the archive into the data cache if absent.
  config.model.name = f"{model}_sdbnn"
  config.objectives = "ce"
  config.cmim.weight = 0.0
  config.batch_size = 128
  config.num_epochs = epochs
  config.optimizer = "sgd"
  config.momentum = 0.9
  config.learning_rate = learning_rate
  config.lr_schedule = "cosine"
  config.warmup_epochs = 0.0
  config.weight_decay = 1e-4
  config.decay_kernels_only = False
  config.ede.t_min = t_min
  config.ede.t_max = 10.0
  # ``smoke`` swaps ResNet-18 for ResNet-20 (resnet18_sdbnn -> resnet20_sdbnn).
  return default_config.apply_variant(config, variant)
