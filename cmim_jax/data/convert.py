r"""Packs an image folder into ArrayRecord shards, without TensorFlow.

  python -m cmim_jax.data.convert SRC DST [--splits train,validation]
      [--examples_per_shard 1024]

``SRC/<split>/<class>/*.{jpg,jpeg,png}`` (torchvision's ImageFolder layout,
one folder per split) becomes ``DST/<split>/<split>.array_record-KKKKK-of-
NNNNN`` plus ``DST/cmim_jax_shards.json`` (classes, splits, shard names),
which the streaming pipeline reads with ``data.data_dir=DST`` (source
'shards' or 'auto'). The encoded image bytes are stored as they are (no
re-encoding), each with its label, its row index and a CRC-32 that every
read checks. Row ``i`` is the streaming folder source's row ``i``, so a run
reads the same examples in the same order from the folder or its shards.

Interrupted? Run the same command again: finished shards (written under a
temporary name, renamed when complete and read back) are kept, the rest is
written. ``DST`` must not hold shards of other data (the listing's
fingerprint is checked).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys

from cmim_jax.data import streaming

PLAN = 'plan.json'


def shard_names(split: str, num_shards: int) -> list[str]:
  return [f'{split}.array_record-{k:05d}-of-{num_shards:05d}'
          for k in range(num_shards)]


def _write_json(path: str, obj) -> None:
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as fh:
    json.dump(obj, fh, indent=1)
  os.replace(tmp, path)


def _read_back(path: str, first: int, count: int) -> None:
  """Checks that ``path`` holds rows ``first .. first + count`` intact."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(path)
  try:
    n = reader.num_records()
    if n != count:
      raise ValueError(f'{path} holds {n} records, expected {count}.')
    for j, record in enumerate(reader.read_all()):
      index = streaming.unpack_record(record, f'{path} record {j}')[0]
      if index != first + j:
        raise ValueError(f'{path} record {j} is row {index}, expected '
                         f'{first + j}.')
  finally:
    reader.close()


def convert_split(src: str, dst: str, split: str, classes: tuple,
                  examples_per_shard: int, progress: bool = True) -> dict:
  """Writes the shards of one split; returns its entry of the metadata."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  listing = streaming.FolderSplit(src, split, classes)
  n = len(listing)
  rows = [listing.fetch_path(i) for i in range(n)]
  stats = []
  for path, label in rows:
    st = os.stat(path)
    stats.append(f'{os.path.relpath(path, src)} {label} {st.st_size} '
                 f'{st.st_mtime_ns}')
  fingerprint = hashlib.sha1('\n'.join(stats).encode()).hexdigest()
  num_shards = max(1, math.ceil(n / examples_per_shard))
  names = shard_names(split, num_shards)
  plan = {'fingerprint': fingerprint, 'num_examples': n, 'shards': names,
          'examples_per_shard': examples_per_shard,
          'classes': list(classes)}
  out_dir = os.path.join(dst, split)
  os.makedirs(out_dir, exist_ok=True)
  plan_path = os.path.join(out_dir, PLAN)
  if os.path.isfile(plan_path):
    with open(plan_path) as fh:
      old = json.load(fh)
    if old != plan:
      raise ValueError(
          f'{out_dir} holds shards of other data or other settings (its '
          f'{PLAN} differs: the images in {src}/{split} changed, or '
          f'--examples_per_shard did). Delete {out_dir} or pick another DST.')
  else:
    _write_json(plan_path, plan)
  for f in os.listdir(out_dir):
    if f.endswith('.tmp'):  # Left by an interrupted run: rewritten below.
      os.remove(os.path.join(out_dir, f))
  done = [os.path.isfile(os.path.join(out_dir, s)) for s in names]
  bar = tqdm.tqdm(total=n, desc=f'{split}', unit='img', disable=not progress,
                  initial=sum(min(examples_per_shard, n - k *
                                  examples_per_shard)
                              for k, d in enumerate(done) if d))
  for k, name in enumerate(names):
    if done[k]:
      continue
    first, stop = k * examples_per_shard, min(n, (k + 1) * examples_per_shard)
    final = os.path.join(out_dir, name)
    tmp = f'{final}.{os.getpid()}.tmp'
    # group_size:1 keeps each record separately addressable: random access
    # reads one record, not a group of them.
    writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
    try:
      for i in range(first, stop):
        path, label = rows[i]
        with open(path, 'rb') as fh:
          data = fh.read()
        writer.write(streaming.pack_record(i, label,
                                           os.path.relpath(path, src), data))
        bar.update(1)
    finally:
      writer.close()
    _read_back(tmp, first, stop - first)
    os.replace(tmp, final)
  bar.close()
  return {'num_examples': n, 'shards': names, 'fingerprint': fingerprint}


def convert(src: str, dst: str, splits=None, examples_per_shard: int = 1024,
            progress: bool = True) -> dict:
  """Packs ``src/<split>/<class>/*`` into shards under ``dst``.

  Args:
    src: the image folder.
    dst: output folder (created; may hold an interrupted earlier run).
    splits: split folder names; None for every subfolder of ``src``.
    examples_per_shard: images per shard.
    progress: show a progress bar.

  Returns:
    The metadata written to ``dst/cmim_jax_shards.json``.
  """
  src = os.path.realpath(os.path.expanduser(src))
  dst = os.path.realpath(os.path.expanduser(dst))
  if not os.path.isdir(src):
    raise ValueError(f'{src} is not a folder (expected SRC/<split>/<class>/'
                     f'*.jpg).')
  if examples_per_shard <= 0:
    raise ValueError(f'examples_per_shard must be > 0, got '
                     f'{examples_per_shard}.')
  if splits is None:
    splits = sorted(e.name for e in os.scandir(src) if e.is_dir())
    if not splits:
      raise ValueError(f'{src} has no split folders (expected SRC/<split>/'
                       f'<class>/*.jpg).')
  classes = tuple(sorted({c for s in splits
                          for c, _ in streaming.list_split(
                              os.path.join(src, s))}))
  os.makedirs(dst, exist_ok=True)
  meta_path = os.path.join(dst, streaming.SHARDS_META)
  meta = {'format': 'cmim_jax shards 1', 'source': src,
          'classes': list(classes), 'splits': {}}
  if os.path.isfile(meta_path):
    old = streaming.read_shards_meta(dst)
    if old['classes'] == list(classes):
      meta['splits'] = old['splits']
  for split in splits:
    meta['splits'][split] = convert_split(src, dst, split, classes,
                                          examples_per_shard, progress)
    _write_json(meta_path, meta)
  return meta


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog='python -m cmim_jax.data.convert',
      description='Pack an image folder SRC/<split>/<class>/* into '
      'ArrayRecord shards for data.data_dir=DST.')
  p.add_argument('src')
  p.add_argument('dst')
  p.add_argument('--splits', default='',
                 help='comma-separated split folders (default: all).')
  p.add_argument('--examples_per_shard', type=int, default=1024)
  p.add_argument('--no_progress', action='store_true')
  a = p.parse_args(argv)
  try:
    meta = convert(a.src, a.dst,
                   [s for s in a.splits.split(',') if s] or None,
                   a.examples_per_shard, not a.no_progress)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for split, info in meta['splits'].items():
    print(f'{split}: {info["num_examples"]} images in '
          f'{len(info["shards"])} shards')
  print(f'{len(meta["classes"])} classes -> {a.dst}; train with '
        f'--config.data.data_dir={a.dst}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

