"""Packed 1-bit export and XNOR-popcount inference.

* :func:`export_workdir` reads a run's latest checkpoint and config, packs
  every binary conv (sign bits along the input channels in ``uint32`` words,
  ``uint16``/``uint8`` for at most 16/8 input channels: one bit per weight,
  per-channel float scale, BatchNorm as a per-channel affine after the
  popcount) and writes one ``.cmimbnn`` file (:mod:`.fileformat`).
* :func:`load` reads such a file and returns a jittable ``images -> logits``
  function (:class:`PackedModel`) that computes every binary layer as XNOR +
  popcount over packed words: on CPU one C++ XLA FFI call per layer
  (:mod:`.ffi`, built on first use; ``CMIM_JAX_FFI=0`` or ``kernel="pure"``
  switch it off), elsewhere and as the fallback in pure JAX (:mod:`.infer`).
* :func:`serialize` / :func:`deserialize`: the packed function as a
  ``jax.export`` (StableHLO) artifact that runs without cmim_jax.
* :func:`compare` checks packed against the training model's eval forward.

Command line: ``python -m cmim_jax.export --workdir runs/x --out model.cmimbnn``
(see :mod:`cmim_jax.export.__main__`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cmim_jax.export import fileformat, infer
from cmim_jax.export.fileformat import FORMAT_VERSION, ExportFileError

EXPORT_SUFFIX = ".cmimbnn"


class PackedModel:
  """A loaded packed model: ``model(images_uint8) -> logits``, jittable.

  Attributes:
    manifest: the file's manifest (model name, layers, input shape, ...).
    program: the :class:`~cmim_jax.export.infer.Program` it runs.
  """

  def __init__(self, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
               kernel: str = "auto"):
    self.manifest = dict(manifest)
    self.program = infer.Program(manifest["layers"], arrays, manifest["input_shape"],
                                 manifest["mean"], manifest["std"], kernel=kernel)

  def with_kernel(self, kernel: str) -> "PackedModel":
    """The same model with binary convs run by ``kernel`` ("auto", "ffi", "pure")."""
    return PackedModel(self.manifest, self.program.arrays, kernel=kernel)

  @property
  def input_shape(self) -> tuple[int, ...]:
    return self.program.input_shape

  def __call__(self, images: jax.Array) -> jax.Array:
    """Logits ``f32[B, classes]`` of uint8 (0..255) NHWC images."""
    return self.program(images)

  def forward(self, x: jax.Array) -> jax.Array:
    """Logits of images already normalised as in training."""
    return self.program.forward(x)

  def packed_bytes(self) -> int:
    """Bytes of all arrays (bits, scales, float stem/head/BN)."""
    return int(sum(a.nbytes for a in self.program.arrays.values()))


def load(path: str, kernel: str = "auto") -> PackedModel:
  """Loads a ``.cmimbnn`` file written by :func:`export_workdir`/:func:`save`.

  Args:
    path: the file.
    kernel: how binary convs run on CPU: "auto" (the C++ XLA FFI kernel of
      :mod:`cmim_jax.export.ffi`, built on first use, where it builds and
      ``CMIM_JAX_FFI`` is not 0; pure JAX otherwise), "ffi" (required) or
      "pure". GPU/TPU always run pure JAX.

  Raises:
    FileNotFoundError: no such file.
    ExportFileError: not a packed model, a future format version (refused by
      its number), or a truncated/corrupt file.
  """
  manifest, arrays = fileformat.load(path)
  for layer in manifest["layers"]:
    if layer.get("op") not in infer.OPS:
      raise ExportFileError(f"{path}: layer {layer.get('name')!r} has op {layer.get('op')!r}, "
                            f"which this cmim_jax cannot run (known: {', '.join(infer.OPS)}).")
    if layer.get("op") == "bconv" and layer.get("shift") not in infer.BCONV_SHIFTS:
      raise ExportFileError(f"{path}: layer {layer.get('name')!r} has input shift "
                            f"{layer.get('shift')!r}, which this cmim_jax cannot run (known: "
                            f"{', '.join(str(v) for v in infer.BCONV_SHIFTS)}).")
    if layer.get("op") == "bconv":
      _check_bits(path, layer, arrays.get(f"{layer.get('name')}/bits"),
                  manifest["format_version"])
  return PackedModel(manifest, arrays, kernel=kernel)


def _check_bits(path, layer, bits, version):
  """A bconv's packed kernel: uint32 words ``[kh, kw, cout, ceil(cin / 32)]``,
  or from format 2 in :func:`infer.stored_word_dtype`."""
  name, cin = layer.get("name"), layer.get("cin")
  if bits is None or not isinstance(cin, int):
    raise ExportFileError(f"{path}: layer {name!r} has no packed kernel (bits) or no cin; "
                          "re-export the model.")
  allowed = {np.dtype(np.uint32)} | ({infer.stored_word_dtype(cin)} if version >= 2 else set())
  want = (*layer.get("kernel", ()), layer.get("cout"), infer.num_words(cin))
  if bits.dtype not in allowed or tuple(bits.shape) != want:
    raise ExportFileError(
        f"{path}: layer {name!r} (cin {cin}) has packed kernel bits {bits.dtype} "
        f"{tuple(bits.shape)}; format version {version} expects "
        f"{' or '.join(sorted(str(d) for d in allowed))} {want}. Re-export the model.")


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------

@dataclasses.dataclass
class ExportResult:
  """What :func:`export_workdir` wrote."""
  path: str
  model_name: str
  step: int | None
  float_bytes: int
  packed_bytes: int
  file_bytes: int
  binary_layers: int

  def summary(self) -> str:
    mib = 1 << 20
    return (f"{self.model_name}: float32 {self.float_bytes / mib:.2f} MiB -> packed "
            f"{self.packed_bytes / mib:.2f} MiB ({self.float_bytes / self.packed_bytes:.1f}x "
            f"smaller; {self.binary_layers} binary layers); file {self.path} "
            f"({self.file_bytes / mib:.2f} MiB)")


def save(path: str, model, variables: Mapping[str, Any], *, model_name: str,
         input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
         extra: Mapping[str, Any] | None = None) -> ExportResult:
  """Packs ``model`` with ``variables`` and writes ``path``.

  Raises:
    pack.NotExportableError: a model without binary layers, or with parts the
      packed format cannot express.
    ValueError: variables that do not match the model.
  """
  from cmim_jax.export import pack  # Needs the training code; loading does not.
  body, arrays = pack.pack_model(model, variables, input_shape=input_shape, mean=mean,
                                 std=std, model_name=model_name)
  float_bytes = pack.float_size_bytes(variables)
  packed_bytes = int(sum(a.nbytes for a in arrays.values()))
  info = {"float_bytes": float_bytes, "packed_bytes": packed_bytes, **(extra or {})}
  file_bytes = fileformat.save(path, body, arrays, extra=info)
  return ExportResult(path=path, model_name=model_name, step=(extra or {}).get("step"),
                      float_bytes=float_bytes, packed_bytes=packed_bytes, file_bytes=file_bytes,
                      binary_layers=sum(l["op"] == "bconv" for l in body["layers"]))


def load_run_config(workdir: str):
  """The config a run was trained with (``WORKDIR/config.json``)."""
  from cmim_jax import train
  try:
    return train.load_run_config(workdir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e} Or pass the config the run was trained with: --config "
                            "configs/FILE.py (plus the same --config.x overrides).") from e


def build_model(config, num_classes: int):
  """The model a config describes (eval only: no cross-device BatchNorm)."""
  from cmim_jax import models
  models.import_modules(config.imports)
  return models.from_config(config.model, num_classes=num_classes, bn_axis_name=None)


def data_facts(config, image_shape: Sequence[int] | None = None
               ) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
  """(image_shape, mean, std) of the config's dataset, without reading the data.

  Mirrors ``input_pipeline.get_datasets``: known datasets have a fixed image
  shape (ImageNet: ``data.image_size`` or 224), ``data.mean``/``data.std``
  override the dataset's own. ``image_shape`` overrides the shape.
  """
  from cmim_jax.data import catalogue
  spec = catalogue.dataset_spec(config.data.name)
  if image_shape is not None:
    shape = tuple(int(v) for v in image_shape)
  elif spec.crop == "resized_crop":
    size = config.data.image_size or 224
    shape = (size, size, 3)
  elif spec.image_shape is not None:
    shape = tuple(spec.image_shape)
  else:
    raise ValueError(f"the image shape of dataset {config.data.name!r} is not known without "
                     "reading it; pass --image_shape H,W,C.")
  c = shape[-1]
  mean = tuple(config.data.mean) or spec.mean or (catalogue.DEFAULT_MEAN,) * c
  std = tuple(config.data.std) or spec.std or (catalogue.DEFAULT_STD,) * c
  return shape, tuple(mean), tuple(std)


def restore_variables(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """``({'params', 'batch_stats'}, step)`` of a checkpoint, without the optimizer state.

  The same read as a teacher's (:func:`cmim_jax.teachers.restore_variables`):
  through the run's Checkpointer, read-only, ``gs://`` included.
  """
  from cmim_jax import teachers
  return teachers.restore_variables(workdir, step)


def export_workdir(workdir: str, out: str, *, config=None, step: int | None = None,
                   image_shape: Sequence[int] | None = None) -> ExportResult:
  """Packs the latest (or ``step``'s) checkpoint of a run into ``out``.

  Args:
    workdir: the run directory (``checkpoints/``, ``config.json``), local or
      remote (``gs://``).
    out: the ``.cmimbnn`` file to write.
    config: the run's config (default: read from the workdir).
    step: checkpoint step (default: the newest intact one; a damaged newer
      one is skipped with a warning, see :func:`restore_variables`).
    image_shape: (H, W, C) override for datasets of unknown shape.
  """
  from cmim_jax import paths
  config = load_run_config(workdir) if config is None else config
  variables, step = restore_variables(workdir, step)
  try:
    num_classes = int(np.shape(variables["params"]["fc"]["kernel"])[-1])
  except KeyError:
    raise ValueError(f"the checkpoint in {workdir} has no classifier params/fc: it does not "
                     f"match model {config.model.name!r}.") from None
  shape, mean, std = data_facts(config, image_shape)
  model = build_model(config, num_classes)
  return save(out, model, variables, model_name=config.model.name, input_shape=shape,
              mean=mean, std=std,
              extra={"step": step, "workdir": str(paths.resolve(workdir)),
                     "dataset": config.data.name})


# --------------------------------------------------------------------------
# jax.export (StableHLO)
# --------------------------------------------------------------------------

def serialize(model: PackedModel, *, batch_size: int | None = None,
              platforms: Sequence[str] | None = None) -> bytes:
  """The packed ``images -> logits`` function as ``jax.export`` bytes.

  The weights are embedded as constants, so the artifact is self-contained:
  ``jax.export.deserialize(data).call(images)`` runs it with JAX alone.

  Args:
    model: a loaded packed model.
    batch_size: a fixed batch size, or None for a symbolic one.
    platforms: lowering platforms (default: the current backend).
  """
  from jax import export as jax_export
  batch = jax_export.symbolic_shape("b")[0] if batch_size is None else batch_size
  spec = jax.ShapeDtypeStruct((batch, *model.input_shape), jnp.uint8)
  # Pure JAX: the artifact must run without cmim_jax's C++ kernel registered.
  model = model.with_kernel("pure")
  exported = jax_export.export(jax.jit(model.__call__), platforms=platforms)(spec)
  return bytes(exported.serialize())


def deserialize(data: bytes):
  """``jax.export.Exported``; call it with ``.call(images)``."""
  from jax import export as jax_export
  return jax_export.deserialize(bytearray(data))


# --------------------------------------------------------------------------
# Exactness
# --------------------------------------------------------------------------

def compare(packed: PackedModel, model, variables: Mapping[str, Any],
            images: np.ndarray) -> dict[str, float]:
  """Packed vs the training model's eval forward on uint8 ``images``.

  Returns:
    ``max_abs_diff`` of the logits, ``argmax_agree`` (fraction of images),
    ``bit_exact`` (1.0 if the logits are identical) and ``n``.
  """
  variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
  x = packed.program.normalize(jnp.asarray(images))
  ref = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  got = jax.jit(packed.forward)(x)
  ref, got = np.asarray(ref), np.asarray(got)
  return {"n": int(len(images)), "max_abs_diff": float(np.max(np.abs(ref - got))),
          "max_abs_logit": float(np.max(np.abs(ref))),
          "argmax_agree": float(np.mean(ref.argmax(-1) == got.argmax(-1))),
          "bit_exact": float(np.array_equal(ref, got))}


__all__ = ["PackedModel", "ExportResult", "ExportFileError", "FORMAT_VERSION", "load", "save",
           "export_workdir", "serialize", "deserialize", "compare", "restore_variables",
           "load_run_config", "build_model", "data_facts"]
