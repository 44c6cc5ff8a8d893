"""CIFAR archive download against a local HTTP server: good, bad checksum, connection cut."""

import hashlib
import http.server
import io
import os
import threading

import pytest

from cmim_jax.data import download

PAYLOAD = os.urandom(300_000)
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
  requests = []

  def do_GET(self):  # pylint: disable=invalid-name
    Handler.requests.append(self.path)
    if self.path.endswith("missing.tar.gz"):
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header("Content-Length", str(len(PAYLOAD)))
    self.end_headers()
    if "cut" in self.path:
      # Half the bytes, then the connection drops (a proxy timeout, a reset).
      self.wfile.write(PAYLOAD[:len(PAYLOAD) // 2])
      self.wfile.flush()
      self.close_connection = True
      return
    self.wfile.write(PAYLOAD)

  def log_message(self, *args):
    pass


@pytest.fixture(scope="module")
def server():
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}"
  httpd.shutdown()
  httpd.server_close()


def only_the_archive(directory, name):
  assert sorted(os.listdir(directory)) == [name], "a temporary file was left behind"


def test_good_checksum_lands_atomically(server, tmp_path, capsys):
  dest = tmp_path / "cache" / "cifar-10-python.tar.gz"
  out = download.fetch(f"{server}/cifar-10-python.tar.gz", str(dest), md5=MD5)
  assert out == str(dest) and dest.read_bytes() == PAYLOAD
  only_the_archive(dest.parent, dest.name)
  progress = capsys.readouterr().err
  assert "Downloading cifar-10-python.tar.gz" in progress and "100.0%" in progress


def test_bad_checksum_keeps_nothing(server, tmp_path):
  dest = tmp_path / "cifar-10-python.tar.gz"
  with pytest.raises(download.DownloadError, match=f"not the published {'0' * 32}"):
    download.fetch(f"{server}/cifar-10-python.tar.gz", str(dest), md5="0" * 32, progress=False)
  assert os.listdir(tmp_path) == []


def test_connection_cut_half_way_keeps_nothing(server, tmp_path):
  dest = tmp_path / "cifar-10-python.tar.gz"
  with pytest.raises(download.DownloadError, match="stopped after"):
    download.fetch(f"{server}/cut/cifar-10-python.tar.gz", str(dest), md5=MD5, progress=False)
  assert os.listdir(tmp_path) == []
  # The next run downloads it again, whole.
  download.fetch(f"{server}/cifar-10-python.tar.gz", str(dest), md5=MD5, progress=False)
  assert dest.read_bytes() == PAYLOAD


def test_unreachable_server_or_missing_file_is_one_clear_error(server, tmp_path):
  dest = tmp_path / "x.tar.gz"
  with pytest.raises(download.DownloadError, match="could not download http://127.0.0.1:9/"):
    download.fetch("http://127.0.0.1:9/x.tar.gz", str(dest), md5=MD5, timeout=5)
  with pytest.raises(download.DownloadError, match="missing.tar.gz: Not Found"):
    download.fetch(f"{server}/missing.tar.gz", str(dest), md5=MD5)
  assert os.listdir(tmp_path) == []


def test_ensure_cifar_uses_the_mirror_and_the_cache(server, tmp_path, monkeypatch):
  monkeypatch.setenv(download.MIRROR_ENV, server + "/")
  monkeypatch.setitem(download.ARCHIVES, "cifar10",
                      download.Archive("cifar-10-python.tar.gz", MD5, len(PAYLOAD)))
  Handler.requests.clear()
  path = download.ensure_cifar("cifar10", str(tmp_path))
  assert path == str(tmp_path / "cifar-10-python.tar.gz") and Handler.requests == [
      "/cifar-10-python.tar.gz"]
  assert download.ensure_cifar("cifar10", str(tmp_path)) == path
  assert len(Handler.requests) == 1  # the cached archive is reused


def test_published_checksums_are_the_real_ones():
  assert download.ARCHIVES["cifar10"].md5 == "c58f30108f718f92721af3b95e74349a"
  assert download.ARCHIVES["cifar100"].md5 == "eb9058c3a382ffc7106e4002c42a8d85"
  assert download.url_for("cifar100") == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def test_progress_without_a_terminal_logs_every_tenth():
  stream = io.StringIO()
  bar = download._Progress("Downloading x", 1000, stream=stream)  # pylint: disable=protected-access
  for done in range(0, 1001, 10):
    bar.update(done)
  bar.update(1000, final=True)
  lines = stream.getvalue().splitlines()
  assert 11 <= len(lines) <= 12 and lines[-1].startswith("Downloading x: [#")


def test_command_line_downloads_into_the_given_cache(server, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(download.MIRROR_ENV, server)
  monkeypatch.setitem(download.ARCHIVES, "cifar100",
                      download.Archive("cifar-100-python.tar.gz", MD5, len(PAYLOAD)))
  assert download.main(["cifar100", "--cache_dir", str(tmp_path)]) == 0
  assert (tmp_path / "cifar-100-python.tar.gz").read_bytes() == PAYLOAD
  monkeypatch.setitem(download.ARCHIVES, "cifar100",
                      download.Archive("cifar-100-python.tar.gz", "1" * 32, len(PAYLOAD)))
  monkeypatch.setenv("CMIM_JAX_DATA", str(tmp_path / "other"))
  assert download.main(["cifar100"]) == 1
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
  assert not (tmp_path / "other" / "cifar-100-python.tar.gz").exists()


def tiny_cifar10_archive(path):
  """A cifar-10-python.tar.gz of 2 images per batch file, in the release's layout."""
  import pickle  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  with tarfile.open(path, "w:gz") as tar:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
      blob = pickle.dumps({b"data": np.full((2, 3072), k, np.uint8), b"labels": [k, k + 1]})
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return path.read_bytes()


def data_config(**overrides):
  from cmim_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  cfg = input_pipeline.get_config()
  cfg.update(dict(name="cifar10", source="auto", data_dir="", prefetch=0), **overrides)
  return cfg


def test_get_datasets_downloads_into_the_cache_once(tmp_path, monkeypatch):
  """data.download=True on a machine without the data: fetched, verified, then reused."""
  from cmim_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  blob = tiny_cifar10_archive(tmp_path / "served.tar.gz")

  class ArchiveHandler(Handler):
    def do_GET(self):  # pylint: disable=invalid-name
      Handler.requests.append(self.path)
      self.send_response(200)
      self.send_header("Content-Length", str(len(blob)))
      self.end_headers()
      self.wfile.write(blob)

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ArchiveHandler)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  try:
    monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setenv("CMIM_JAX_DATA", str(tmp_path / "cache"))
    monkeypatch.setitem(download.ARCHIVES, "cifar10", download.Archive(
        "cifar-10-python.tar.gz", hashlib.md5(blob).hexdigest(), len(blob)))
    Handler.requests.clear()
    cfg = data_config(download=True)
    train, _, info = input_pipeline.get_datasets(cfg, global_batch_size=2, seed=0)
    assert info.source == "cifar_archive" and (info.num_train, info.num_eval) == (10, 2)
    assert sorted(os.listdir(tmp_path / "cache"))[-1] == "cifar-10-python.tar.gz"
    assert train.get_batch(0)["image"].shape == (2, 32, 32, 3)
    input_pipeline.get_datasets(cfg, global_batch_size=2, seed=0)
    assert Handler.requests == ["/cifar-10-python.tar.gz"]  # the second run reads the cache
  finally:
    httpd.shutdown()
    httpd.server_close()


def test_offline_download_fails_with_the_usual_message(tmp_path, monkeypatch):
  from cmim_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(download.MIRROR_ENV, "http://127.0.0.1:9")  # nothing listens there
  monkeypatch.setenv("CMIM_JAX_DATA", str(tmp_path / "cache"))
  with pytest.raises(FileNotFoundError) as e:
    input_pipeline.get_datasets(data_config(download=True), global_batch_size=2, seed=0)
  message = str(e.value)
  assert "could not download http://127.0.0.1:9/cifar-10-python.tar.gz" in message
  assert "To provide it" in message and "tfds build" not in message
  assert not [n for n in os.listdir(tmp_path / "cache") if n.endswith((".gz", ".part"))]
