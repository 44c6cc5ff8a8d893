r"""The default training configuration: every key the trainer reads.

This module is the single source of truth for the configuration; every file
under ``configs/`` starts from :func:`get_config` and overrides what it needs.
A config file outside the repository does the same::

  # my_config.py
  from cmim_jax import default_config

  def get_config():
    config = default_config.get_config()
    config.model.name = "resnet20"
    return config

  python -m cmim_jax.main --config my_config.py --workdir runs/mine

Run the default itself (CIFAR-10, ResNet-18 1w1a with CMIM) with

  python -m cmim_jax.main --config configs/default.py --workdir runs/default

and shrink it to a one-minute CPU run with ``configs/default.py:smoke``.

Importing this module imports neither JAX nor tensorflow_datasets, so a
config can be read, printed and checked on a machine without an accelerator.
"""

import importlib.util
import os
import types

import ml_collections


def data_config() -> ml_collections.ConfigDict:
  """The ``data`` section: where the data lies, splits and augmentation."""
  c = ml_collections.ConfigDict()
  # 'cifar10', 'cifar100', 'imagenet2012', 'digits', or a custom name for a
  # folder/tfds dataset (then mean/std default to 0.5).
  c.name = "cifar10"
  # 'auto' | 'tfds' | 'cifar_archive' | 'folder' | 'digits' | 'shards'
  # (ArrayRecord shards from `python -m cmim_jax.data.convert`, streamed).
  # 'auto' takes the first source that finds data (cifar: tfds, cifar_archive, folder).
  c.source = "auto"
  # The tfds data dir (local or gs://; '' = tfds default), the folder holding
  # the CIFAR archive (or the .tar.gz itself), or the image folder (or its
  # .tar.gz). Ignored by 'digits'.
  c.data_dir = ""
  # tfds-style split strings, the same meaning for every source:
  # 'train', 'train[:45000]', 'train[90%:]', 'train[:10]+test', ...
  c.train_split = "train"
  # '' for no evaluation split. ImageNet's is 'validation'.
  c.eval_split = "test"
  # 'auto' (the dataset's default: 'device' for CIFAR and folders, 'host' for
  # ImageNet, 'none' for digits), 'device' (uint8 batches, pad-crop-flip inside
  # the jitted step), 'host' (numpy/PIL augmentation in the iterator) or 'none'.
  c.augment = "auto"
  # Where decoded folder images are cached as .npy files ('' = memory only).
  # Keep it outside the repository, e.g. '~/.cache/cmim_jax'.
  c.cache_dir = ""
  # Output side for datasets of varying image size (ImageNet; 0 = 224).
  # Fixed-size datasets keep their size and only accept 0 or that size.
  c.image_size = 0
  # ImageNet evaluation: central crop fraction of the shorter side (224/256).
  c.eval_crop_fraction = 0.875
  # Per-channel normalisation on the 0..1 scale; () = the dataset's own,
  # 0.5 for custom datasets.
  c.mean = ()
  c.std = ()
  # Batches prepared ahead by a background thread (0 = no thread). No shuffle
  # buffer: each epoch is a full permutation of the split.
  c.prefetch = 2
  # Threads for per-image host work (tfds reads, ImageNet crops); 0 = up to
  # 16, by CPU count.
  c.num_threads = 0
  # CIFAR-10/100: when no source finds the data, download the python archive
  # (checksum-verified) into the data cache. The CIFAR configs turn it on.
  c.download = False
  # 'memory' decodes a split once into memory (CIFAR-size data, images of one
  # size); 'stream' lists files and decodes + crops every batch in worker
  # processes (ImageNet: image folders, `cmim_jax.data.convert` shards, tfds
  # array_record); 'auto' streams varying-size datasets (imagenet2012) and
  # shards, and keeps the rest in memory.
  c.pipeline = "auto"
  # Streaming: Grain worker processes building batches (0 = in the main
  # process, with the prefetch thread; -1 = one per CPU core, up to 16).
  c.workers = -1
  # Streaming: an image that cannot be decoded stops the run naming its path
  # ('error'), or is skipped, logged and counted ('skip'; the next image of
  # the split takes its place so batches keep their size).
  c.on_corrupt = "error"
  return c


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """The default configuration, optionally shrunk by ``variant``.

  Args:
    variant: '' (as is) or 'smoke' (a one-minute CPU run); see
      :func:`apply_variant`.

  Returns:
    A ConfigDict holding every key the trainer and the data pipeline read.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds initialisation, shuffling and augmentation.

  config.data = data_config()

  # Modules imported before the model is built: they may register models,
  # quantizers and parts of your own (README, "Extending").
  config.imports = ()

  # The model: a registered name (cmim_jax.models.names(); '*_fp' = real twin)
  # and one key per model field (models.from_config). None keeps the model's
  # default; a key the chosen model has no field for is an error. Written out
  # (not models.config_section()) so that reading a config imports no JAX;
  # tests/test_extending.py checks the two agree.
  placeholder = ml_collections.config_dict.placeholder
  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet18"
  config.model.input_quantizer = placeholder(str)  # e.g. 'ede_sign', 'ste_sign(clip=1.5)'.
  config.model.kernel_quantizer = placeholder(str)  # e.g. 'irnet_weight', 'xnor_weight'.
  config.model.dtype = placeholder(str)  # Computation dtype: 'bfloat16' on TPU.
  config.model.stage_sizes = placeholder(tuple)  # ResNets: blocks per stage.
  config.model.widths = placeholder(tuple)  # Channels per stage (VGG-small: per conv).
  config.model.block_cls = placeholder(str)  # ResNets: 'BasicBlock' | 'BiRealBlock'.
  config.model.shortcut = placeholder(str)  # binary | real | option_a | avgpool_real.
  config.model.stem = placeholder(str)  # cifar | imagenet.
  config.model.stem_act = placeholder(bool)  # hardtanh after the stem BN.
  config.model.head_bn = placeholder(bool)  # BN before the classifier.
  config.model.input_shift = placeholder(str)  # 'ASD(reduction=16)' (SD-BNN) | 'none'.
  config.model.pool_after = placeholder(tuple)  # VGG-small: convs followed by a max pool.
  config.model.strides = placeholder(tuple)  # ReActNet-A: stride of the stem, then of each block.
  config.model.backbone = placeholder(str)  # MLP-head models: the registered backbone.
  config.model.head_hidden = placeholder(int)  # MLP-head models: hidden width (backbone fc).
  config.model.embed_dim = placeholder(int)  # MLP-head models: output (embedding) width.

  # IR-Net error-decay estimator: t = t_min * 10^(e/E log10(t_max/t_min)),
  # k = max(1/t, 1), with e the epoch and E the number of epochs; the step
  # computes it from its step counter (train.ede_schedule).
  config.ede = ml_collections.ConfigDict()
  # 1e-2 is CMIM's code (its --Tmin default). IR-Net's paper starts at 0.1, its
  # ResNet-20 1w1a code and SD-BNN's code at 1e-3 (binarize.ede_schedule says
  # where each value comes from): set it per recipe.
  config.ede.t_min = 1e-2
  config.ede.t_max = 10.0

  # The loss: comma-separated registered terms (cmim_jax.objectives.names()),
  # each 'name' or 'name:weight'. Without a weight a term takes its section's
  # `weight` (cmim.weight, kd.weight), else 1; weight 0 leaves it out exactly.
  # E.g. 'ce,cmim' (CMIM paper), 'ce:0,kd' or 'kd' (ReActNet), 'ce,kd:0.5'.
  config.objectives = "ce,cmim"

  # The workdir of an earlier run used as a frozen teacher (its config.json
  # and latest checkpoint); '' = none. Terms such as 'kd' need one.
  config.teacher = ""
  # The workdir of an earlier run whose weights start this run (matching
  # names; the optimizer starts fresh); '' = none. Ignored when resuming.
  config.init_from = ""

  # Knowledge distillation: T^2 * KL(softmax(teacher/T) || softmax(student/T)).
  config.kd = ml_collections.ConfigDict()
  config.kd.weight = 1.0
  config.kd.temperature = 1.0  # T; 1 = ReActNet's distributional loss.

  # CMIM's released-code form (objective 'crd', needs config.teacher): CRD-style
  # NCE between teacher and student penultimate features through two
  # momentum memory banks (n_train x embed_dim each, on every device).
  config.crd = ml_collections.ConfigDict()
  config.crd.weight = 3.2  # The released code's alpha.
  config.crd.embed_dim = 128
  config.crd.num_negatives = 4096
  config.crd.temperature = 0.1
  config.crd.momentum = 0.5
  config.crd.class_aware = True  # Drop drawn negatives of the sample's (last seen) class.

  # CMIM (Shang et al. 2022): symmetric InfoNCE between the projected binary and
  # latent real activations of the tapped layers, negatives from the global batch.
  config.cmim = ml_collections.ConfigDict()
  config.cmim.weight = 3.2  # lambda; 0 switches CMIM off exactly (the base BNN).
  config.cmim.temperature = 0.1  # tau.
  config.cmim.layers = "last:3"  # 'last:N' = last binary layer of each of the last N
  #                                stages, or comma-separated path patterns.
  config.cmim.embed_dim = 128  # Output size of each projection head.
  # 'batch': the negatives are the other samples of the global batch;
  # 'memory': num_negatives per sample from two momentum memory banks per
  # tapped layer (n_train x embed_dim each, replicated on every device).
  config.cmim.negatives = "batch"
  config.cmim.num_negatives = 4096
  config.cmim.momentum = 0.5  # Bank update: m * old + (1 - m) * new.
  config.cmim.class_aware = False  # Drop drawn negatives of the sample's class.

  # MoCo v2 (objective 'moco', label-free): InfoNCE of the student's embedding
  # (an MLP head on its features, fc's input) against a momentum key
  # encoder's embedding of a second view, negatives from a queue of past keys.
  config.moco = ml_collections.ConfigDict()
  config.moco.weight = 1.0
  config.moco.temperature = 0.2  # tau (MoCo v2 and S2-BNN).
  config.moco.momentum = 0.999  # Key encoder: m * key + (1 - m) * student.
  config.moco.queue_size = 65536  # A multiple of batch_size.
  config.moco.embed_dim = 128
  config.moco.hidden_dim = 0  # Of the MLP head; 0 = the features' size.

  # S2-BNN's guided distribution calibration (objective 'calibration',
  # label-free, needs config.teacher): CE(softmax(z_T / tau), log_softmax(z_S / tau))
  # of the L2-normalised embeddings of a frozen self-supervised teacher and
  # of the student (the `moco`
  # term's head when the run has one, else a head of its own).
  config.calibration = ml_collections.ConfigDict()
  config.calibration.weight = 1.0
  config.calibration.temperature = 0.2
  # The teacher's embedding: 'auto' (its run's `moco` head if it trained one,
  # else its output, as `tv_resnet50_moco` from cmim_jax.models.moco_convert),
  # a term name (that term's trained head) or '' (its output).
  config.calibration.teacher_head = "auto"

  # Training views. augment '' = the dataset's augmentation (data.augment);
  # 'moco_v2' = MoCo v2 views drawn on device (cmim_jax/data/views.py): random
  # resized crop, colour jitter, grayscale, blur, flip. A term that needs a
  # second view (moco) gets one either way.
  config.views = ml_collections.ConfigDict()
  config.views.augment = ""
  config.views.crop_scale = (0.2, 1.0)  # Area fraction of the random resized crop.
  config.views.jitter = (0.4, 0.4, 0.4, 0.1)  # Brightness, contrast, saturation, hue.
  config.views.jitter_prob = 0.8  # MoCo v2: 0.8; S2-BNN's code: 0.6.
  config.views.gray_prob = 0.2
  config.views.blur_prob = -1.0  # -1 = 0.2 for images of 96+ pixels (ImageNet), else 0.
  config.views.flip = True

  config.batch_size = 128  # Global batch, split over all devices of all hosts.
  config.eval_batch_size = 0  # 0 = batch_size.
  config.num_epochs = 400.0
  config.num_train_steps = -1  # > 0 overrides num_epochs.

  config.optimizer = "sgd"  # sgd | adam | adamw.
  config.learning_rate = 0.1  # Peak learning rate (after warm-up).
  config.momentum = 0.9  # SGD momentum.
  config.weight_decay = 1e-4  # L2 (sgd, adam) or decoupled decay (adamw).
  config.decay_kernels_only = True  # Decay conv/dense kernels only, not BN or shifts.
  config.decay_dense_kernels = True  # False: conv kernels only (ReActNet spares the classifier).
  config.lr_schedule = "cosine"  # cosine | linear | constant, after warm-up.
  config.warmup_epochs = 0.0  # Linear warm-up from 0.

  # Linear-probe evaluation (--mode linear_probe, cmim_jax/linear_probe.py): a
  # linear classifier trained on the frozen backbone's penultimate features
  # (the input of its `fc`, eval-mode BatchNorm), top-1 on data.eval_split.
  # Defaults: S2-BNN's linear evaluation (MoCo's main_lincls.py), SGD with
  # momentum, rate x0.1 from each milestone epoch, no weight decay.
  config.linear_probe = ml_collections.ConfigDict()
  config.linear_probe.epochs = 100
  config.linear_probe.learning_rate = 0.1
  config.linear_probe.momentum = 0.9
  config.linear_probe.weight_decay = 0.0
  config.linear_probe.batch_size = 256  # Global, over all devices and hosts.
  config.linear_probe.milestones = (60, 80)  # Epochs; increasing.
  # True: the dataset's training augmentation (data.augment; ImageNet: random
  # resized crop + flip, as MoCo; CIFAR: pad-crop-flip), the backbone run on
  # every batch. False: none, and the features are computed once.
  config.linear_probe.augment = True

  config.log_every_steps = 100  # Train metrics to metrics.jsonl, TensorBoard and the log.
  config.eval_every_steps = 1000  # Also evaluated at the end.
  config.checkpoint_every_steps = 1000  # Also saved at the end.
  config.keep_checkpoints = 3  # Keep the last K checkpoints.
  config.parallel = "shard_map"  # shard_map (jit over a mesh) | pmap.
  return apply_variant(config, variant)


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Shared config arguments: '' (as is) or 'smoke' (a one-minute CPU run).

  Raises:
    ValueError: for any other ``variant``, listing the known ones.
  """
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


def sibling_config(config_file: str, name: str) -> types.ModuleType:
  """The config file ``name`` in the folder of ``config_file``, loaded by path.

  Config files are loaded by path (``--config configs/x.py``), not imported
  as a package, so a config that builds on another loads it this way:
  ``default_config.sibling_config(__file__, "imagenet.py").get_config()``.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  spec = importlib.util.spec_from_file_location(
      "_cmim_jax_config_" + os.path.splitext(name)[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
