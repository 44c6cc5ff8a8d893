"""A PyTorch MoCo v2 checkpoint as a teacher workdir of this library.

MoCo's ``main_moco.py`` (facebookresearch/moco) saves
``{'epoch', 'arch', 'state_dict', 'optimizer'}`` where ``state_dict`` holds
the query encoder ``module.encoder_q.*`` (a torchvision ResNet whose ``fc``
is, with ``--mlp``, ``Sequential(Linear(d, d), ReLU, Linear(d, 128))``:
``fc.0.*`` and ``fc.2.*``), the key encoder ``module.encoder_k.*`` and the
``queue``. S2-BNN's teacher is that query encoder, loaded from the public
MoCo v2 ResNet-50 (800 epochs) checkpoint.

:func:`from_moco_state_dict` maps the query encoder onto the variables of
``tv_resnet50_moco`` (:mod:`cmim_jax.models.embedding`): ``fc.0`` becomes
the backbone's ``fc``, ``fc.2`` the ``proj`` layer; the key encoder and the
queue are left out. :func:`write_teacher_workdir` writes what
``config.teacher`` reads: ``config.json`` (the default config with
``model.name`` and ``data.name`` set) and a step-0 checkpoint holding
``params/model`` and ``batch_stats``.

Command line (needs torch, the ``[bench]`` extra)::

  python -m cmim_jax.models.moco_convert moco_v2_800ep_pretrain.pth.tar \\
      --out ~/teachers/moco_v2_r50

then train with ``--config.teacher=~/teachers/moco_v2_r50`` on ImageNet
(``data.name='imagenet2012'``; MoCo's input normalisation is ImageNet's, as
this library's).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

# MoCo's query encoder, as DataParallel/DDP (``module.``) or bare saves it.
PREFIXES = ("module.encoder_q.", "encoder_q.")
# Saved alongside the query encoder, not part of it.
_OTHER = ("module.encoder_k.", "encoder_k.", "module.queue", "queue")
MODELS = {"resnet50": "tv_resnet50_moco"}


def _state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
  if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
    return checkpoint["state_dict"]
  return checkpoint


def from_moco_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, dict]:
  """Variables of ``tv_resnet50_moco`` from a MoCo v2 checkpoint.

  Args:
    checkpoint: MoCo's saved dict (with ``'state_dict'``) or the state dict
      itself; values numpy arrays or CPU torch tensors.

  Returns:
    ``{'params': {'backbone': ..., 'proj': ...}, 'batch_stats':
    {'backbone': ...}}`` nested dicts of numpy arrays.

  Raises:
    ValueError: no query encoder (``encoder_q.``) in it; a linear head
      (MoCo v1, no ``--mlp``); keys that belong to neither encoder (listed).
  """
  from cmim_jax.models import tv_resnet  # pylint: disable=g-import-not-at-top
  sd = _state_dict(checkpoint)
  encoder, unknown = {}, []
  for key, value in sd.items():
    prefix = next((p for p in PREFIXES if key.startswith(p)), None)
    if prefix is not None:
      encoder[key[len(prefix):]] = value
    elif not key.startswith(_OTHER):
      unknown.append(key)
  if unknown:
    raise ValueError(f"not parameters of a MoCo model (encoder_q, encoder_k, queue): "
                     f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
  if not encoder:
    raise ValueError("no query encoder in this checkpoint: expected keys starting with "
                     f"{' or '.join(PREFIXES)} (MoCo's main_moco.py saves them so).")
  if "fc.weight" in encoder:
    raise ValueError("this MoCo checkpoint has a linear head (fc.weight: MoCo v1, trained "
                     "without --mlp); tv_resnet50_moco is MoCo v2's MLP head "
                     "(fc.0, ReLU, fc.2).")
  head = {k: encoder.pop(k) for k in ("fc.2.weight", "fc.2.bias") if k in encoder}
  if len(head) != 2 or "fc.0.weight" not in encoder:
    raise ValueError("expected MoCo v2's MLP head encoder_q.fc.0.{weight,bias} and "
                     f"encoder_q.fc.2.{{weight,bias}}; found fc keys "
                     f"{sorted(k for k in encoder if k.startswith('fc'))}")
  # fc.0 is the backbone's own classifier layer in tv_resnet50_moco.
  for leaf in ("weight", "bias"):
    encoder[f"fc.{leaf}"] = encoder.pop(f"fc.0.{leaf}")
  backbone = tv_resnet.from_torchvision_state_dict(encoder)
  variables = {"params": {"backbone": backbone["params"],
                          "proj": {"kernel": np.asarray(head["fc.2.weight"]).T,
                                   "bias": np.asarray(head["fc.2.bias"])}}}
  if "batch_stats" in backbone:
    variables["batch_stats"] = {"backbone": backbone["batch_stats"]}
  return variables


def write_teacher_workdir(variables: Mapping[str, Any], workdir: str, *,
                          model_name: str = "tv_resnet50_moco",
                          data_name: str = "imagenet2012") -> str:
  """Writes ``config.json`` and a step-0 checkpoint that ``config.teacher`` reads.

  The variables are checked against the model's own shapes first (on an
  ImageNet-size input), so a mismatched checkpoint fails here, not later in
  training.

  Args:
    variables: ``{'params', 'batch_stats'}`` of ``model_name``.
    workdir: the directory to write (created; local or ``gs://``).
    model_name: the registered model the variables belong to.
    data_name: the dataset the teacher will be used on (``config.data.name``
      of the run that uses it must be the same).

  Returns:
    The workdir.
  """
  # JAX and orbax only here: the converter itself needs numpy alone.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cmim_jax import checkpointing, default_config, models, run_config, teachers  # pylint: disable=g-import-not-at-top

  model = models.get_model(model_name)
  want = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                        jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  what = f"converted weights for {model_name!r}"
  teachers.check_shapes(variables["params"], want["params"], what=what)
  teachers.check_shapes(variables.get("batch_stats", {}), want.get("batch_stats", {}), what=what)
  config = default_config.get_config()
  config.model.name = model_name
  config.data.name = data_name
  run_config.save_run_config(config, workdir)
  state = {"step": np.zeros((), np.int32),
           "params": {"model": jax.tree.map(lambda a: np.asarray(a, np.float32),
                                            dict(variables["params"]))},
           "batch_stats": jax.tree.map(lambda a: np.asarray(a, np.float32),
                                       dict(variables.get("batch_stats", {})))}
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    ckpt.save(0, state)
  finally:
    ckpt.close()
  return workdir


def _load_torch(path: str) -> Mapping[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit("reading a PyTorch checkpoint needs torch: pip install -e '.[bench]' "
                     "(or torch alone, CPU build)") from None
  checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.numpy() if hasattr(v, "numpy") else v
          for k, v in _state_dict(checkpoint).items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m cmim_jax.models.moco_convert",
      description="Convert a PyTorch MoCo v2 checkpoint into a teacher workdir "
                  "(config.teacher) of cmim_jax.")
  parser.add_argument("checkpoint", help="MoCo's .pth.tar (module.encoder_q.* state dict)")
  parser.add_argument("--out", required=True, help="the workdir to write")
  parser.add_argument("--arch", default="resnet50", choices=sorted(MODELS),
                      help="the encoder's architecture (default resnet50)")
  parser.add_argument("--data", default="imagenet2012",
                      help="config.data.name of the runs that will use the teacher")
  args = parser.parse_args(argv)
  variables = from_moco_state_dict(_load_torch(args.checkpoint))
  write_teacher_workdir(variables, args.out, model_name=MODELS[args.arch], data_name=args.data)
  print(f"wrote {args.out}: model {MODELS[args.arch]!r}, data {args.data!r}; use it with "
        f"--config.teacher={args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
