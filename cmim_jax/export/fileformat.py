"""The ``.cmimbnn`` file: one zip archive, a JSON manifest and ``.npy`` arrays.

Layout (stored, not compressed: packed bits do not compress)::

  manifest.json         {"format": "cmim_jax.packed_bnn", "format_version": 2,
                         "model_name", "input_shape", "input_dtype", "mean",
                         "std", "num_classes", "word_bits", "layers": [...],
                         "arrays": {key: {"shape", "dtype", "sha256"}}, ...}
  arrays/<key>.npy      one per array, ``<key>`` = ``<layer name>/<field>``

Only NumPy and the standard library are needed to read it. A file written
by a newer format version is refused by its version number; a truncated or
corrupted file (bad zip, missing member, checksum mismatch) raises
:class:`ExportFileError` naming the file and what is wrong.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from typing import Any, Mapping

import numpy as np

FORMAT = "cmim_jax.packed_bnn"
# 2: a binary kernel with at most 8 (16) input channels stores its bits as
# uint8 (uint16) words (1: uint32 for every layer); this version reads both,
# and writes 1 where no array needs 2 (so older readers keep reading those).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class ExportFileError(ValueError):
  """A packed-model file that cannot be read; the message says why."""


def _npy_bytes(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
  return buf.getvalue()


def required_version(arrays: Mapping[str, np.ndarray]) -> int:
  """The lowest format version that describes ``arrays``: 2 if a kernel's
  ``bits`` are narrower than uint32, else 1."""
  narrow = any(k.endswith("/bits") and np.asarray(v).dtype.itemsize < 4 for k, v in arrays.items())
  return 2 if narrow else 1


def save(path: str, body: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
         extra: Mapping[str, Any] | None = None) -> int:
  """Writes the file atomically (temporary file, then rename).

  Args:
    path: destination.
    body: manifest fields (model name, layers, input shape, ...).
    arrays: ``{key: array}``.
    extra: more manifest fields (provenance: workdir, step, sizes).

  Returns:
    The file size in bytes.
  """
  manifest = {"format": FORMAT, "format_version": required_version(arrays), **body,
              **(extra or {})}
  blobs = {k: _npy_bytes(np.asarray(v)) for k, v in arrays.items()}
  manifest["arrays"] = {
      k: {"shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.str,
          "sha256": hashlib.sha256(blobs[k]).hexdigest()} for k, v in arrays.items()}
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".cmimbnn", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
      z.writestr(MANIFEST, json.dumps(manifest, indent=1))
      for k, blob in blobs.items():
        z.writestr(f"arrays/{k}.npy", blob)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return os.path.getsize(path)


def read_manifest(z: zipfile.ZipFile, path: str) -> dict:
  try:
    manifest = json.loads(z.read(MANIFEST))
  except KeyError:
    raise ExportFileError(f"{path}: no {MANIFEST} in the archive; not a cmim_jax packed "
                          "model (write one with python -m cmim_jax.export).") from None
  except (ValueError, zipfile.BadZipFile, OSError) as e:
    raise ExportFileError(f"{path}: the manifest is corrupt ({e}); re-export the model.") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ExportFileError(f"{path}: not a cmim_jax packed model (format "
                          f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                          f"expected {FORMAT!r}).")
  version = manifest.get("format_version")
  if not isinstance(version, int) or version < 1:
    raise ExportFileError(f"{path}: invalid format_version {version!r}.")
  if version > FORMAT_VERSION:
    raise ExportFileError(
        f"{path}: format version {version} is newer than this cmim_jax reads (up to "
        f"version {FORMAT_VERSION}); upgrade cmim_jax to load it.")
  for key in ("model_name", "input_shape", "mean", "std", "layers", "arrays"):
    if key not in manifest:
      raise ExportFileError(f"{path}: the manifest has no {key!r}; re-export the model.")
  return manifest


def load(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads and verifies a file.

  Returns:
    ``(manifest, arrays)``.

  Raises:
    FileNotFoundError: no such file.
    ExportFileError: not a packed model, a newer format version, or a
      truncated/corrupt file (the message says which).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no packed model at {path}; write one with "
                            "python -m cmim_jax.export --workdir DIR --out FILE.")
  try:
    z = zipfile.ZipFile(path, "r")
  except (zipfile.BadZipFile, OSError) as e:
    raise ExportFileError(f"{path}: not a readable archive ({e}); the file is truncated or "
                          "corrupt, or not a cmim_jax packed model. Re-export it.") from e
  with z:
    manifest = read_manifest(z, path)
    arrays = {}
    for key, meta in manifest["arrays"].items():
      try:
        blob = z.read(f"arrays/{key}.npy")
      except KeyError:
        raise ExportFileError(f"{path}: array {key!r} is missing; the file is truncated or "
                              "corrupt. Re-export it.") from None
      except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        # zipfile's own CRC check lands here for flipped bytes.
        raise ExportFileError(f"{path}: array {key!r} cannot be read ({e}); the file is "
                              "truncated or corrupt. Re-export it.") from e
      if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise ExportFileError(f"{path}: array {key!r} fails its checksum; the file is corrupt. "
                              "Re-export it.")
      a = np.load(io.BytesIO(blob), allow_pickle=False)
      if list(a.shape) != list(meta["shape"]) or a.dtype.str != meta["dtype"]:
        raise ExportFileError(f"{path}: array {key!r} has shape {a.shape} {a.dtype}, the "
                              f"manifest says {meta['shape']} {meta['dtype']}.")
      arrays[key] = a
  for layer in manifest["layers"]:
    needed = [k for k in arrays if k.startswith(layer.get("name", "") + "/")]
    if layer.get("op") in ("bconv", "conv", "dense", "bn", "channel_add", "rprelu") and not needed:
      raise ExportFileError(f"{path}: layer {layer.get('name')!r} has no arrays; re-export.")
  return manifest, arrays
