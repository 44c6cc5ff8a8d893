r"""S2-BNN on ImageNet (Shen et al., CVPR 2021; szq0214/S2-BNN): the README's rows.

The argument is ``ROW[,STEP][,smoke]``. Rows (official README, ImageNet
linear top-1 of ReActNet-A):

  moco_baseline      MoCo v2 as published (SGD 0.03, cosine, wd 1e-4, colour
                     jitter p 0.8), one step with binary weights and
                     activations                                          46.9
  moco_enhanced      S2-BNN's "enhanced MoCo v2" (``Contrastive_only``): Adam
                     3e-4, linear decay, wd 1e-4, jitter p 0.6, two steps   52.5
  moco_calibration   ``Contrastive+Distillation``: moco + calibration from
                     the FP MoCo v2 teacher, wd 0, two steps               56.0
  calibration        ``Distillation_only``: calibration alone, wd 0, two
                     steps                                                61.5

Steps (S2-BNN's and ReActNet's two-step training): ``step1`` trains binary
activations with real weights (``kernel_quantizer='identity'``), ``step2``
binarises the weights too, starting from step 1's weights::

  python -m cmim_jax.main --config configs/s2bnn_imagenet.py:calibration,step1 \
      --workdir runs/s2_in_step1 --config.teacher=runs/moco_v2_r50 \
      --config.data.data_dir=/data/imagenet
  python -m cmim_jax.main --config configs/s2bnn_imagenet.py:calibration,step2 \
      --workdir runs/s2_in_step2 --config.teacher=runs/moco_v2_r50 \
      --config.init_from=runs/s2_in_step1 --config.data.data_dir=/data/imagenet

then a linear probe (``--mode linear_probe``: SGD 0.1, batch 256, 100
epochs, x0.1 at 60 and 80). Each step: batch 256, 200 epochs, MoCo v2 views
(random resized crop 0.2-1, jitter, grayscale 0.2, blur 0.2, flip), tau 0.2,
queue 65,536, key-encoder momentum 0.999, 128-d embeddings from an MLP head
``1024 -> 1024 -> ReLU -> 128`` on ReActNet-A's features.

``config.teacher`` is the workdir of a real-valued self-supervised teacher:
the public MoCo v2 800-epoch ResNet-50 converted by ``python -m
cmim_jax.models.moco_convert`` (``tv_resnet50_moco``, whose output is the
128-d embedding), or a run of this library trained with ``objectives='moco'``
(its ``moco`` head embeds); ``calibration.teacher_head='auto'`` tells them
apart by the run's ``config.objectives``. What differs from the official code: the views are cropped
on device from the host's central 224-pixel crop (``data.augment='none'``)
rather than from the full-resolution image; the key encoder uses global
BatchNorm instead of shuffled BN (``cmim_jax/objectives/moco.py`` says why);
step 2 restarts the MoCo head, queue and key encoder from step 1's student
instead of loading them. Not run here (no ImageNet on this machine).
"""

from cmim_jax import default_config

ROWS = ("moco_baseline", "moco_enhanced", "moco_calibration", "calibration")
STEPS = ("step1", "step2")


def get_config(arg: str = "calibration,step2"):
  parts = [p for p in (arg or "").split(",") if p]
  smoke = "smoke" in parts
  parts = [p for p in parts if p != "smoke"]
  row = parts[0] if parts else ""
  step = parts[1] if len(parts) > 1 else ""
  if row not in ROWS or len(parts) > 2 or (row == "moco_baseline") != (step == "") or (
      step and step not in STEPS):
    raise ValueError(f"unknown S2-BNN ImageNet argument {arg!r}: write ROW,STEP[,smoke] with ROW "
                     f"in {list(ROWS[1:])} and STEP in {list(STEPS)}, or 'moco_baseline' "
                     "(one step), e.g. --config configs/s2bnn_imagenet.py:calibration,step1.")
  config = default_config.sibling_config(__file__, "imagenet.py").set_data(
      default_config.get_config())  # configs/imagenet.py's data,
  config.data.augment = "none"  # but the views are drawn on device.
  config.model.name = "reactnet_a"
  config.model.input_quantizer = ""
  config.model.kernel_quantizer = "identity" if step == "step1" else ""
  config.objectives = {"moco_baseline": "moco", "moco_enhanced": "moco",
                       "moco_calibration": "moco,calibration",
                       "calibration": "calibration"}[row]
  config.cmim.weight = 0.0
  config.views.augment = "moco_v2"
  config.views.blur_prob = 0.2
  config.views.jitter_prob = 0.8 if row == "moco_baseline" else 0.6
  config.moco.temperature = 0.2
  config.moco.momentum = 0.999
  config.moco.queue_size = 65536
  config.moco.embed_dim = 128
  config.calibration.temperature = 0.2
  config.batch_size = 256
  config.num_epochs = 200.0
  config.warmup_epochs = 0.0
  if row == "moco_baseline":  # MoCo v2's own recipe (its main_moco.py defaults + --cos).
    config.optimizer, config.learning_rate, config.momentum = "sgd", 0.03, 0.9
    config.weight_decay, config.lr_schedule = 1e-4, "cosine"
  else:  # S2-BNN: Adam, lr * (1 - epoch / epochs) (its "--cos" is linear).
    config.optimizer, config.learning_rate, config.lr_schedule = "adam", 3e-4, "linear"
    config.weight_decay = 1e-4 if row == "moco_enhanced" else 0.0
  config.decay_kernels_only = False  # torch's weight_decay covers every parameter.
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 2500
  if smoke:
    config = default_config.apply_variant(config, "smoke")
    config.moco.queue_size = 256
    config.data.workers = 2
  return config
