"""Fetches the CIFAR-10/100 python archives, checksum-verified, atomically, into a cache.

Used when ``data.download`` is true and the archive is in neither
``data.data_dir`` nor the cache. The file is streamed into a temporary name
next to its destination while its MD5 is computed, compared with the digest
published with the dataset, and only then renamed into place: an interrupted
or corrupted download never leaves a file that a later run would read.

``$CMIM_JAX_CIFAR_MIRROR`` replaces the base address (a local or institute
mirror holding the same files; the published checksums still apply).

By hand (e.g. on a login node with internet, before an offline job)::

  python -m cmim_jax.data.download cifar100 [--cache_dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
import uuid

from absl import logging

MIRROR_ENV = "CMIM_JAX_CIFAR_MIRROR"
BASE_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclasses.dataclass(frozen=True)
class Archive:
  filename: str
  md5: str  # As published on the dataset page (and used by torchvision).
  size: int


ARCHIVES = {
    "cifar10": Archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 170498071),
    "cifar100": Archive("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", 169001437),
}


class DownloadError(OSError):
  """The archive could not be fetched or failed its checksum; nothing was kept."""


def url_for(name: str) -> str:
  base = os.environ.get(MIRROR_ENV) or BASE_URL
  return base.rstrip("/") + "/" + ARCHIVES[name].filename


def md5_of(path: str, chunk: int = 1 << 20) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      digest.update(block)
  return digest.hexdigest()


class _Progress:
  """A one-line progress bar on a terminal; a log line every 10% otherwise."""

  def __init__(self, label: str, total: int | None, stream=None):
    self.label, self.total = label, total
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.start = time.time()
    self.last_draw = 0.0
    self.last_decile = -1

  def update(self, done: int, final: bool = False) -> None:
    now = time.time()
    rate = done / max(now - self.start, 1e-9) / 1e6
    if self.total:
      frac = min(done / self.total, 1.0)
      bar = "#" * int(frac * 30)
      text = (f"{self.label}: [{bar:<30}] {100 * frac:5.1f}% {done / 1e6:.1f}/"
              f"{self.total / 1e6:.1f} MB {rate:.1f} MB/s")
      decile = int(frac * 10)
    else:
      text, decile = f"{self.label}: {done / 1e6:.1f} MB {rate:.1f} MB/s", -1
    if self.tty:
      if final or now - self.last_draw > 0.2:
        self.stream.write("\r" + text + ("\n" if final else ""))
        self.stream.flush()
        self.last_draw = now
    elif decile > self.last_decile or final:
      self.last_decile = decile
      self.stream.write(text + "\n")
      self.stream.flush()


def fetch(url: str, dest: str, *, md5: str, size: int | None = None, timeout: float = 60.0,
          progress: bool = True, chunk: int = 1 << 20) -> str:
  """Downloads ``url`` to ``dest`` if its MD5 is ``md5``; returns ``dest``.

  Raises:
    DownloadError: the server could not be reached, the transfer stopped
      early, or the checksum differs. No file is left at ``dest`` (nor a
      temporary one) in any of these cases.
  """
  directory = os.path.dirname(os.path.abspath(dest))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(dest)}.{uuid.uuid4().hex[:8]}.part")
  digest, done = hashlib.md5(), 0
  try:
    try:
      response = urllib.request.urlopen(url, timeout=timeout)  # pylint: disable=consider-using-with
    except (urllib.error.URLError, OSError) as e:
      reason = getattr(e, "reason", e)
      raise DownloadError(f"could not download {url}: {reason}") from None
    with response, open(tmp, "wb") as out:
      length = response.headers.get("Content-Length")
      total = int(length) if length and length.isdigit() else size
      bar = _Progress(f"Downloading {os.path.basename(dest)}", total) if progress else None
      try:
        for block in iter(lambda: response.read(chunk), b""):
          out.write(block)
          digest.update(block)
          done += len(block)
          if bar:
            bar.update(done)
      except (OSError, http.client.HTTPException) as e:  # A reset, a timeout, IncompleteRead.
        raise DownloadError(f"download of {url} stopped after {done} bytes: "
                            f"{type(e).__name__}: {e}") from None
      if bar:
        bar.update(done, final=True)
      out.flush()
      os.fsync(out.fileno())
    if total is not None and done != total:
      raise DownloadError(f"download of {url} stopped after {done} of {total} bytes.")
    if digest.hexdigest() != md5:
      raise DownloadError(
          f"{url} has MD5 {digest.hexdigest()}, not the published {md5}; the file was "
          "discarded. Retry (a proxy or a cut transfer can corrupt it), or fetch it by hand "
          f"and put it at {dest}.")
    os.replace(tmp, dest)  # Atomic: readers see no file or the whole, verified one.
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  logging.info("Downloaded %s (%d bytes, MD5 verified) to %s.", url, done, dest)
  return dest


def ensure_cifar(name: str, cache_dir: str, *, progress: bool = True,
                 timeout: float = 60.0) -> str:
  """Path of ``cache_dir/<archive>``, downloading it first when absent."""
  if name not in ARCHIVES:
    raise ValueError(f"no download is known for {name!r}; known: {sorted(ARCHIVES)}.")
  archive = ARCHIVES[name]
  directory = os.path.expanduser(cache_dir)
  dest = os.path.join(directory, archive.filename)
  if os.path.isfile(dest):
    return dest
  os.makedirs(directory, exist_ok=True)
  # Processes sharing the cache (several per host) download once: the others
  # wait on the lock and then find the file.
  with open(os.path.join(directory, f".{archive.filename}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.isfile(dest):
      return dest
    return fetch(url_for(name), dest, md5=archive.md5, size=archive.size, timeout=timeout,
                 progress=progress)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Download a CIFAR python archive into the cache.")
  parser.add_argument("name", choices=sorted(ARCHIVES))
  parser.add_argument("--cache_dir", default=None,
                      help="default: $CMIM_JAX_DATA, else ~/.cache/cmim_jax")
  args = parser.parse_args(argv)
  try:
    from cmim_jax.data.loaders import cifar_archive  # pylint: disable=g-import-not-at-top
    path = ensure_cifar(args.name, args.cache_dir or cifar_archive.cache_dir())
  except DownloadError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
