"""Workdir paths, local or remote (``gs://``), through one abstraction: ``etils.epath``.

Every file a run writes or reads under its workdir (metrics, TensorBoard
events, checkpoints, the run lock) and the paths of earlier runs it loads
(teacher, ``init_from``) go through :func:`resolve`. Orbax uses ``epath`` as
well, so a ``gs://bucket/runs/x`` workdir is one place that every process of
a TPU pod or SLURM job writes to.

Remote schemes need the ``cloud`` extra (``pip install 'cmim_jax[cloud]'``,
which installs ``gcsfs``); without it :func:`resolve` raises
:class:`RemotePathError` naming the extra, before anything is written
(rather than a local directory called ``gs:``).
"""

from __future__ import annotations

import importlib.util
import io
import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]

# scheme -> (fsspec protocol, pip package that implements it)
_REMOTE = {"gs": ("gcs", "gcsfs"), "s3": ("s3", "s3fs")}


class RemotePathError(ImportError):
  """A remote workdir whose storage backend is not installed."""


def scheme(path: PathLike) -> str | None:
  """``'gs'`` for ``gs://b/x``; ``None`` for a local path."""
  text = os.fspath(path)
  head, sep, _ = text.partition("://")
  return head if sep and head.isalnum() else None


def is_remote(path: PathLike) -> bool:
  return scheme(path) is not None


def _backend_available(protocol: str) -> bool:
  # etils routes gs:// through TensorFlow's gfile when TF is installed.
  if importlib.util.find_spec("tensorflow") is not None:
    return True
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    fsspec.get_filesystem_class(protocol)  # Imports gcsfs / s3fs.
  except (ImportError, ValueError):
    return False
  return True


def check_supported(path: PathLike, *, what: str = "workdir") -> None:
  """Raises :class:`RemotePathError` when ``path`` is remote and cannot be reached."""
  s = scheme(path)
  if s is None:
    return
  if s not in _REMOTE:
    raise RemotePathError(
        f"{what} {os.fspath(path)!r}: the scheme {s}:// is not supported; use a local "
        f"path or one of {', '.join(k + '://' for k in _REMOTE)}.")
  protocol, package = _REMOTE[s]
  if not _backend_available(protocol):
    extra = "cloud" if s == "gs" else None
    how = (f"pip install 'cmim_jax[{extra}]' (installs {package})" if extra
           else f"pip install {package}")
    raise RemotePathError(
        f"{what} {os.fspath(path)!r} is on {s}:// but {package} is not installed: {how}, "
        "or use a local path.")


def resolve(path: PathLike, *, what: str = "workdir") -> epath.Path:
  """``path`` as an ``epath.Path``: absolute when local, checked when remote."""
  check_supported(path, what=what)
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def join(base: PathLike, *parts: str) -> epath.Path:
  return resolve(base).joinpath(*parts)


# ---------------------------------------------------------------------------
# TensorBoard event files on remote storage
# ---------------------------------------------------------------------------

class _EpathRecordWriter:
  """A tensorboardX record writer backed by ``epath``.

  Object stores cannot append, so the events are buffered and the whole file
  is rewritten on flush (event files of a run are small: scalars only).
  """

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    self._path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathWriterFactory:

  def open(self, path: str) -> _EpathRecordWriter:
    return _EpathRecordWriter(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def register_tensorboard_backends() -> None:
  """Routes tensorboardX's remote event files through ``epath`` (no boto / google-cloud-storage)."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  for s in _REMOTE:
    record_writer.register_writer_factory(s, _EpathWriterFactory())
