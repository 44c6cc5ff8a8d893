"""From a trained Flax BNN to a packed layer program.

Every binary conv becomes a ``bconv`` layer: the signs of its effective
(quantized) kernel packed along the input channels into ``uint32`` words,
``[kh, kw, cout, words]``, and its per-output-channel scale ``alpha`` (the
XNOR / IR-Net scale; 1 for WSD) kept as float32. The following BatchNorm is
a per-channel affine applied to ``alpha * dot`` with the same float
operations as ``flax.linen.BatchNorm`` so that the packed model reproduces
the training model's eval forward bit for bit (a fused ``a * dot + b`` would
round differently in the last bit and could flip a sign downstream).
Stem, shortcuts with weights other than binary ones, and the classifier stay
float32.

Supported: :class:`cmim_jax.models.ResNet` (``BasicBlock``,
``BiRealBlock``, Bi-Real Net's ``BiRealNetBlock`` and ReActNet's and SD-BNN
ImageNet's, which add RPReLU / PReLU after each add; every shortcut kind and
stem) and
:class:`cmim_jax.models.VGGSmall`, with sign-forward input quantizers, any
weight quantizer whose output is ``+-alpha_c`` per output channel, and the
SD-BNN ASD and ReActNet RSign input shifts; ReActNet-A
(:class:`cmim_jax.models.ReActNetA`). Each architecture's program is written
by its walker: :mod:`cmim_jax.export.pack_resnet`, :mod:`~cmim_jax.export.pack_vgg`,
:mod:`~cmim_jax.export.pack_reactnet_a`.
Anything else is refused with the reason.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cmim_jax import binarize, layers
from cmim_jax.export import infer, pack_reactnet_a, pack_resnet, pack_vgg
from cmim_jax.export.errors import NotExportableError  # Re-exported: pack.NotExportableError.
from cmim_jax.models import common, reactnet_a, resnet, vgg


def _np(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def _float(x) -> np.ndarray:
  return _np(x).astype(np.float32)


def _eps() -> float:
  return float(common.batch_norm(False, None, jnp.float32).keywords["epsilon"])


def check_sign_quantizer(q: binarize.QuantizerLike, model_name: str) -> None:
  """Refuses an input quantizer whose forward pass is not ``x >= 0 -> +1 else -1``."""
  probe = jnp.array([-3.0, -0.5, -1e-30, -0.0, 0.0, 1e-30, 0.5, 3.0], jnp.float32)
  try:
    out = _np(binarize.get(q)(probe, **dict(binarize.DEFAULT_SCHEDULE)))
  except Exception as e:  # A quantizer that needs more than the schedule.
    raise NotExportableError(
        f"model {model_name!r}: cannot evaluate input quantizer {q!r} ({e}); the packed "
        "format needs a sign quantizer.") from e
  want = np.where(_np(probe) >= 0, 1.0, -1.0)
  if not np.array_equal(out, want):
    raise NotExportableError(
        f"model {model_name!r}: input quantizer {q!r} is not a sign function "
        f"(maps {_np(probe).tolist()} to {out.tolist()}); XNOR-popcount inference needs "
        "+-1 activations (x >= 0 -> +1).")


def binary_kernels(layer_params: Sequence[Mapping[str, Any]], kernel_quantizer, names: Sequence[str],
                   model_name: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """Sign bits and per-output-channel scale of each layer's effective kernel.

  One jitted call quantizes every kernel (eager dispatch would compile each
  operation per kernel shape).

  Returns:
    per layer ``(signs bool[..., cin, cout], alpha f32[cout])`` with
    ``effective_kernel == alpha * where(signs, 1, -1)`` exactly.
  """
  params = [{k: v for k, v in p.items() if k != "input_shift"} for p in layer_params]
  quantize = jax.jit(lambda ps: [layers.effective_kernel(p, kernel_quantizer,
                                                         binarize.DEFAULT_SCHEDULE) for p in ps])
  out = []
  for name, w_b in zip(names, quantize(params)):
    w_b = _float(w_b)
    mag = np.abs(w_b).reshape(-1, w_b.shape[-1])
    alpha = mag.max(axis=0)
    if not np.array_equal(mag, np.broadcast_to(alpha, mag.shape)) or not np.all(np.isfinite(alpha)):
      raise NotExportableError(
          f"model {model_name!r}, layer {name!r}: kernel quantizer {kernel_quantizer!r} does "
          "not give +-alpha per output channel (or gives NaN/Inf, e.g. IR-Net on a constant "
          "filter); only 1-bit kernels pack.")
    out.append((~np.signbit(w_b), alpha.astype(np.float32)))
  return out


class _Builder:
  """Accumulates the layer list and its arrays."""

  def __init__(self, model, variables, model_name):
    self.model = model
    self.params = variables["params"]
    self.stats = variables.get("batch_stats", {})
    self.model_name = model_name
    self.layers: list[dict] = []
    self.arrays: dict[str, np.ndarray] = {}
    self.eps = _eps()
    self.pending: list[tuple[str, Mapping[str, Any]]] = []

  def finish(self):
    """Quantizes and packs every binary kernel at once."""
    if not self.pending:
      return
    names = [n for n, _ in self.pending]
    kernels = binary_kernels([p for _, p in self.pending], self.model.kernel_quantizer, names,
                             self.model_name)
    for name, (signs, alpha) in zip(names, kernels):
      self.arrays[f"{name}/bits"] = infer.narrow_words(
          infer.pack_bits_np(np.transpose(signs, (0, 1, 3, 2))), signs.shape[2])
      self.arrays[f"{name}/alpha"] = alpha

  float = staticmethod(_float)

  def _get(self, tree, path):
    node = tree
    for p in path.split("/"):
      if p not in node:
        raise NotExportableError(f"model {self.model_name!r}: no variables at {path!r} "
                                 "(checkpoint does not match the model)")
      node = node[p]
    return node

  def add(self, op, name, src="x", dst="x", arrays=None, **attrs):
    layer = {"op": op, "name": name, "src": src, "dst": dst, **attrs}
    for k, v in (arrays or {}).items():
      self.arrays[f"{name}/{k}"] = v
    self.layers.append(layer)

  def bconv(self, path, *, strides, padding, src="x", dst="x"):
    p = self._get(self.params, path)
    kh, kw, cin, cout = np.shape(p["kernel"])
    self.pending.append((path, p))  # bits and alpha: see finish()
    arrays, attrs = {}, {}
    if "input_shift" in p:
      shift = p["input_shift"]
      if set(shift) == {"fc1", "fc2"}:
        arrays["shift_fc1"] = _float(shift["fc1"]["kernel"])
        arrays["shift_fc2"] = _float(shift["fc2"]["kernel"])
        attrs["shift"] = "asd"
      elif set(shift) == {"beta"}:
        # RSign's shift feeds only the sign, not the shortcut: its own op into
        # a scratch register keeps the block input intact. (A bconv attribute
        # would be silently ignored by a reader that predates it; an unknown
        # op is refused by name.)
        self.add("channel_add", f"{path}/input_shift", src, "s",
                 {"bias": _float(shift["beta"])})
        src = "s"
      else:
        raise NotExportableError(
            f"model {self.model_name!r}, layer {path!r}: unknown input shift with params "
            f"{sorted(shift)}; SD-BNN's ASD and ReActNet's RSign pack.")
    self.add("bconv", path, src, dst, arrays, cin=int(cin), cout=int(cout),
             kernel=[int(kh), int(kw)], strides=[strides, strides],
             padding=[[padding, padding], [padding, padding]], **attrs)

  def conv(self, path, *, strides, padding, src="x", dst="x"):
    k = _float(self._get(self.params, path)["kernel"])
    self.add("conv", path, src, dst, {"kernel": k}, strides=[strides, strides],
             padding=[[padding, padding], [padding, padding]])

  def bn(self, path, src="x", dst=None):
    p, s = self._get(self.params, path), self._get(self.stats, path)
    self.add("bn", path, src, src if dst is None else dst,
             {"mean": _float(s["mean"]), "var": _float(s["var"]),
              "scale": _float(p["scale"]), "bias": _float(p["bias"])}, eps=self.eps)

  def rprelu(self, path, src="x", dst=None):
    p = self._get(self.params, path)
    self.add("rprelu", path, src, src if dst is None else dst,
             {k: _float(p[k]) for k in ("gamma", "slope", "zeta")})

  def prelu(self, path, src="x", dst=None):
    # A PReLU is an RPReLU with zero shifts: x - 0 and + 0 are exact, so the
    # packed op gives the training model's values bit for bit.
    slope = _float(self._get(self.params, path)["slope"])
    self.add("rprelu", path, src, src if dst is None else dst,
             {"gamma": np.zeros_like(slope), "slope": slope, "zeta": np.zeros_like(slope)})

  def dense(self, path):
    p = self._get(self.params, path)
    arrays = {"kernel": _float(p["kernel"])}
    if "bias" in p:
      arrays["bias"] = _float(p["bias"])
    self.add("dense", path, arrays=arrays, bias="bias" in p)

  def op(self, op, name, src="x", dst=None, **attrs):
    self.add(op, name, src, src if dst is None else dst, **attrs)


_EXPORTERS = ((resnet.ResNet, pack_resnet.build), (vgg.VGGSmall, pack_vgg.build),
              (reactnet_a.ReActNetA, pack_reactnet_a.build))


def _exporter(model, model_name):
  for cls, fn in _EXPORTERS:
    if isinstance(model, cls):
      return fn
  raise NotExportableError(
      f"model {model_name!r} ({type(model).__name__}) has no packed exporter; supported: "
      f"{', '.join(c.__name__ for c, _ in _EXPORTERS)}.")


def check_exportable(model, model_name: str) -> None:
  """Raises :class:`NotExportableError` naming the model and the reason."""
  iq = getattr(model, "input_quantizer", None)
  kq = getattr(model, "kernel_quantizer", None)
  # Checked first: a full-precision model (an FP twin, a tv_resnet teacher) has
  # nothing to pack whatever its class.
  if iq is not None and kq is not None and binarize.is_identity(iq) and binarize.is_identity(kq):
    twin = " Export its binary twin (the name without '_fp')." if model_name.endswith("_fp") else ""
    raise NotExportableError(
        f"model {model_name!r} is full precision (identity quantizers): it has no binary "
        f"layers to pack.{twin}")
  _exporter(model, model_name)
  if isinstance(model, resnet.ResNet) and pack_resnet.block_kind(model.block_cls) is None:
    raise NotExportableError(pack_resnet.no_block_exporter(model, model_name))
  if binarize.is_identity(iq) or binarize.is_identity(kq):
    raise NotExportableError(
        f"model {model_name!r} binarizes only its {'kernels' if binarize.is_identity(iq) else 'inputs'}; "
        "XNOR-popcount inference needs both weights and activations binary.")
  if jnp.dtype(model.dtype) != jnp.float32:
    raise NotExportableError(
        f"model {model_name!r} computes in {jnp.dtype(model.dtype).name}; export a float32 "
        "model (--config.model.dtype=float32) so the packed logits can match it.")
  check_sign_quantizer(iq, model_name)


def check_variables(model, variables, input_shape: Sequence[int], model_name: str) -> None:
  """Raises ``ValueError`` naming the first variable whose path or shape differs from the model's."""
  x = jnp.zeros((1, *input_shape), jnp.float32)
  want = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)
  want = {k: want[k] for k in ("params", "batch_stats") if k in want}
  got = {k: variables[k] for k in want if k in variables}
  flat_want = {jax.tree_util.keystr(p): v.shape
               for p, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  flat_got = {jax.tree_util.keystr(p): np.shape(v)
              for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
  missing = sorted(set(flat_want) - set(flat_got))
  extra = sorted(set(flat_got) - set(flat_want))
  wrong = sorted(k for k in set(flat_want) & set(flat_got) if tuple(flat_want[k]) != tuple(flat_got[k]))
  if missing or extra or wrong:
    parts = []
    if missing:
      parts.append(f"missing {missing[:3]}")
    if extra:
      parts.append(f"unexpected {extra[:3]}")
    if wrong:
      k = wrong[0]
      parts.append(f"{k} has shape {tuple(flat_got[k])}, the model wants {tuple(flat_want[k])}"
                   + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    raise ValueError(
        f"the checkpoint does not match model {model_name!r} with input shape "
        f"{tuple(input_shape)}: {'; '.join(parts)}. Export with the config the run was "
        "trained with (its model name, fields and dataset).")


def pack_model(model, variables: Mapping[str, Any], *, input_shape: Sequence[int],
               mean: Sequence[float], std: Sequence[float], model_name: str,
               num_classes: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """Packs a trained model.

  Args:
    model: the Flax module (e.g. ``models.get_model(name, num_classes=...)``).
    variables: ``{'params': ..., 'batch_stats': ...}``.
    input_shape: (H, W, C) of one image.
    mean, std: per-channel normalisation on the 0..1 scale.
    model_name: the registry name, recorded in the manifest.
    num_classes: recorded in the manifest (default: the classifier's width).

  Returns:
    ``(manifest_body, arrays)``: the manifest fields other than the format
    version, and ``{'<layer>/<key>': np.ndarray}``.

  Raises:
    NotExportableError: a model without binary layers or with parts the
      packed format cannot express (the message says which).
    ValueError: variables that do not match the model.
  """
  check_exportable(model, model_name)
  check_variables(model, variables, input_shape, model_name)
  b = _Builder(model, variables, model_name)
  _exporter(model, model_name)(b, model)
  b.finish()
  if num_classes is None:
    num_classes = int(np.shape(variables["params"]["fc"]["kernel"])[-1])
  channels = int(input_shape[-1])
  mean = [float(v) for v in np.broadcast_to(np.asarray(mean, np.float64), (channels,))]
  std = [float(v) for v in np.broadcast_to(np.asarray(std, np.float64), (channels,))]
  body = {
      "model_name": model_name,
      "input_shape": [int(v) for v in input_shape],
      "input_dtype": "uint8",
      "mean": mean,
      "std": std,
      "num_classes": num_classes,
      "word_bits": infer.WORD_BITS,
      "layers": b.layers,
  }
  return body, b.arrays


def float_size_bytes(variables: Mapping[str, Any]) -> int:
  """Bytes of the float32 eval variables (params + batch_stats)."""
  return int(sum(4 * np.size(v) for v in jax.tree.leaves(
      {k: variables[k] for k in ("params", "batch_stats") if k in variables})))
