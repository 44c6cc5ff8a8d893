r"""Default configuration: every key the trainer reads, with what it does.

Other configs import this one and override. Run it (CIFAR-10, ResNet-18 1w1a
with CMIM) with

  python -m cmim_jax.main --config configs/default.py --workdir runs/default

and shrink it to a one-minute CPU run with ``configs/default.py:smoke``.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds initialisation, shuffling and augmentation.

  # Data (cmim_jax/input_pipeline.py documents the remaining keys).
  from cmim_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config.data = input_pipeline.get_config()
  config.data.name = "cifar10"  # cifar10 | cifar100 | imagenet2012 | digits | any folder name.
  config.data.source = "auto"  # auto | tfds | cifar_archive | folder | digits.
  config.data.data_dir = ""  # Where the data lies ('' = the source's default places).
  config.data.train_split = "train"  # tfds-style split strings, e.g. 'train[:45000]'.
  config.data.eval_split = "test"
  config.data.augment = "auto"  # auto | device (jax.random, in the step) | host | none.

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet18"  # cmim_jax.models.get_model name ('*_fp' = real twin).
  config.model.input_quantizer = ""  # '' = the model's default (IR-Net 'ede_sign').
  config.model.kernel_quantizer = ""  # '' = the model's default ('irnet_weight').
  config.model.dtype = "float32"  # Computation dtype (bfloat16 on TPU).
  config.model.stage_sizes = ()  # ResNets: blocks per stage; () = the model's own.

  # IR-Net error-decay estimator schedule: t = t_min * 10^(e/E log10(t_max/t_min)),
  # k = max(1/t, 1), updated per epoch, passed to the step as arrays.
  config.ede = ml_collections.ConfigDict()
  config.ede.t_min = 1e-2  # CMIM's code; IR-Net uses 0.1.
  config.ede.t_max = 10.0

  # CMIM (Shang et al. 2022): symmetric InfoNCE between the projected binary and
  # latent real activations of the tapped layers, negatives from the global batch.
  config.cmim = ml_collections.ConfigDict()
  config.cmim.weight = 3.2  # lambda; 0 switches CMIM off exactly (the base BNN).
  config.cmim.temperature = 0.1  # tau.
  config.cmim.layers = "last:3"  # 'last:N' = last binary layer of each of the last N
  #                                stages, or comma-separated path patterns.
  config.cmim.embed_dim = 128  # Output size of each projection head.

  config.batch_size = 128  # Global batch, split over all devices of all hosts.
  config.eval_batch_size = 0  # 0 = batch_size.
  config.num_epochs = 400.0
  config.num_train_steps = -1  # > 0 overrides num_epochs.

  config.optimizer = "sgd"  # sgd | adam | adamw.
  config.learning_rate = 0.1  # Peak learning rate (after warm-up).
  config.momentum = 0.9  # SGD momentum.
  config.weight_decay = 1e-4  # L2 (sgd, adam) or decoupled decay (adamw).
  config.decay_kernels_only = True  # Decay conv/dense kernels only, not BN or shifts.
  config.lr_schedule = "cosine"  # cosine | linear | constant, after warm-up.
  config.warmup_epochs = 0.0  # Linear warm-up from 0.

  config.log_every_steps = 100  # Train metrics to metrics.jsonl, TensorBoard and the log.
  config.eval_every_steps = 1000  # Also evaluated at the end.
  config.checkpoint_every_steps = 1000  # Also saved at the end.
  config.keep_checkpoints = 3  # Keep the last K checkpoints.
  config.parallel = "shard_map"  # shard_map (jit over a mesh) | pmap.
  return apply_variant(config, variant)


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Shared config arguments: '' (as is) or 'smoke' (a one-minute CPU run)."""
  if variant in ("", None):
    return config
  if variant == "smoke":
    config.batch_size = 32
    config.num_train_steps = 20
    config.log_every_steps = 5
    config.eval_every_steps = 20
    config.checkpoint_every_steps = 10
    config.data.eval_split = config.data.train_split.split("[")[0] + "[:256]"
    if config.model.name.startswith("resnet18"):
      config.model.name = config.model.name.replace("resnet18", "resnet20")
    if config.data.image_size:  # Varying-size data (ImageNet): small crops.
      config.data.image_size = min(config.data.image_size, 64)
    return config
  raise ValueError(f"unknown config argument {variant!r}; known: '', 'smoke'.")
