"""Input pipeline throughput: CIFAR-10 in memory, or ImageNet-style streaming.

Default (CIFAR-10 from the shared JPEG archive):

Times (1) decoding the 50,000 JPEGs of cifar10-train.tar.gz once into
memory, then augmented batches of 128 (2) with host augmentation (numpy
pad-crop-flip in the iterator, then transfer and on-device normalisation)
and (3) with device augmentation (uint8 gather on the host, transfer, jitted
``preprocess_on_device`` doing crop, flip and normalisation). The last line
printed is a JSON object.

Run:
  .venv/bin/python bench/input_pipeline.py [--data PATH] [--batches 200]

``--imagenet``: ImageNet-style decode + random-resized crop 224 + flip on a
generated folder of variable-size JPEGs (``--images``; or ``--folder DIR``
of your own ``*.JPEG``). The generated sizes follow ImageNet's train set:
long side 500 px for 44%, 150-499 px for 55%, 1000-2500 px for 1%,
aspect up to 1.6, three in four landscape. ``--jpeg`` sets the encoding:
``q96-444`` (default): quality 96 without chroma subsampling, ~0.8 bytes
per pixel, what most ImageNet train files are (a survey of the whole train
set's quantisation tables and sampling factors found the large majority
colour, 4:4:4 and quality 96; 22 CMYK files and one PNG among 1.28M);
``q90-420``: quality 90 with 4:2:0 chroma, the common web/camera setting
and a cheaper decode, for a second data point. The JSON gives the
folder's mean size, share of large (>= 1000 px) images and file size.

Each per-image method runs alone in a fresh process pinned to one core and
is timed in that process's CPU time (so that waiting for the core on a
loaded machine does not count): its rate is images per CPU-second, i.e.
per core. Peak RSS is the process's own, and ``*_decode_rss_growth_mb``
how far decoding raised it over the RSS before the loop (Linux).
``--rounds`` rounds run the methods in turn, and rates and speed-ups are
medians over rounds (speed-ups: of per-round ratios, so that a drifting
load on a shared machine moves them less). Each rate is also given without the large images
(``*_not_large_*``).

* ``pil_baseline``: ``Image.open().convert('RGB')``, crop, resize 224
  bilinear, flip: torchvision's default ``ImageFolder`` +
  ``RandomResizedCrop`` path on PIL images.
* ``decode_only``: the full-size decode alone, no crop, no resize: the
  ceiling of any method that decodes the whole image.
* ``stream_full_decode``: this library's crop (``decode.decode_crop``)
  with full-size decoding by Pillow.
* ``stream_pil``: the same with reduced-size JPEG decoding (Pillow's
  ``draft``), the library's path where the partial-decode shim
  (``data/jpeg_crop.py``) is unavailable.
* ``stream_pillow_resize``: reduced-size decoding of only the rows and
  columns the crop needs (the shim), resized by Pillow: the library's path
  before the shim resized too, and where its self-check against the
  installed Pillow fails.
* ``stream``: the library's path: the shim decodes the window and resizes
  it (Pillow's arithmetic, SIMD) in one call; same output as
  ``stream_pil`` and ``stream_pillow_resize``.
* ``window_decode_only``: ``stream``'s decode alone, without the resize:
  the same header read, window and scale, decoded into the same packed
  buffer of the window's columns (``jpeg_crop.decode_region``); the rest of
  ``stream`` is the resize and the writing into the output. (Until
  2026-12-02 it decoded into a canvas of the whole scaled image instead,
  what ``stream_pillow_resize`` decodes: an approximation.)

Then the whole streaming pipeline (``get_datasets`` + Grain workers,
``--workers``, batches of ``--batch-size``): images/s overall and per
worker, and the peak RSS of the main process plus its workers.

  .venv/bin/python bench/input_pipeline.py --imagenet [--images 300]
"""

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # Runs from a checkout without installing.

# jax and the pipeline are imported where used: the per-core methods run in
# spawned processes, which import this module and need neither.


def _default_data() -> str:
  base = os.environ.get('CMIM_SHARED_DATA',
                        os.path.join(REPO, '..', 'shared', 'data'))
  return os.path.join(base, 'cifar10-train.tar.gz')


def _rate(images: int, seconds: float) -> float:
  return round(images / seconds, 1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', default=_default_data(),
                      help='cifar10-train.tar.gz (or its extracted folder)')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--batches', type=int, default=200,
                      help='timed batches per mode (after one warm-up batch)')
  parser.add_argument('--prefetch', type=int, default=0,
                      help='iterator prefetch depth (0: no thread)')
  parser.add_argument('--imagenet', action='store_true',
                      help='ImageNet-style streaming benchmark (see above)')
  parser.add_argument('--images', type=int, default=300)
  parser.add_argument('--folder', default='',
                      help='--imagenet: a folder of JPEGs instead of '
                      'generated ones')
  parser.add_argument('--workers', type=int, default=0,
                      help='--imagenet: Grain workers (0: one per core; '
                      '-1: skip the pipeline run)')
  parser.add_argument('--rounds', type=int, default=3,
                      help='--imagenet: rounds of the per-core methods')
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--methods', default=','.join(METHODS),
                      help='--imagenet: comma-separated per-core methods '
                      '(pil_baseline is always run)')
  parser.add_argument('--jpeg', default='q96-444', choices=sorted(_JPEG),
                      help='--imagenet: encoding of the generated files')
  args = parser.parse_args(argv)
  if args.imagenet:
    return imagenet_main(args)
  import jax  # pylint: disable=g-import-not-at-top
  from cmim_jax import default_config  # pylint: disable=g-import-not-at-top
  from cmim_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  if not os.path.exists(args.data):
    reason = (f'{args.data} not found; pass --data or set CMIM_SHARED_DATA '
              f'to the folder holding cifar10-train.tar.gz')
    print(f'Skipping the input pipeline benchmark: {reason}.')
    print(json.dumps({'benchmark': 'input_pipeline', 'skipped': True,
                      'reason': reason}))
    return 0

  cfg = default_config.data_config()
  cfg.update(dict(name='cifar10', source='folder', data_dir=args.data,
                  train_split='train', eval_split='', prefetch=args.prefetch))
  bs, n = args.batch_size, args.batches
  result = {'benchmark': 'input_pipeline', 'data': args.data,
            'backend': jax.default_backend(),
            'device': str(jax.devices()[0].device_kind), 'batch_size': bs,
            'batches': n, 'prefetch': args.prefetch,
            'cpu_count': os.cpu_count()}

  input_pipeline.clear_cache()
  start = time.perf_counter()
  cfg.augment = 'host'
  train, _, info = input_pipeline.get_datasets(cfg, global_batch_size=bs,
                                               seed=0)
  result['decode_s'] = round(time.perf_counter() - start, 2)
  result['decode_images_per_s'] = _rate(info.num_train, result['decode_s'])

  def run(train, augment):
    """Images/s of host iteration alone and of iteration + device step."""

    @jax.jit
    def step(key, step_no, images):
      rng = jax.random.fold_in(key, step_no)
      x = input_pipeline.preprocess_on_device(rng, images, info=info,
                                              train=True, augment=augment)
      return x.sum()  # Forces the whole preprocessing; tiny to return.

    key = jax.random.key(0)
    it = train.iterator(0, num_steps=n + 1)
    step(key, 0, next(it)['image']).block_until_ready()  # Compile.
    start = time.perf_counter()
    for i, batch in enumerate(it, start=1):
      out = step(key, i, jax.device_put(batch['image']))
    out.block_until_ready()
    end_to_end = _rate(n * bs, time.perf_counter() - start)
    start = time.perf_counter()
    for _ in train.iterator(0, num_steps=n):
      pass
    host_only = _rate(n * bs, time.perf_counter() - start)
    return host_only, end_to_end

  host_only, host_total = run(train, 'host')
  result['host_aug_iterator_images_per_s'] = host_only
  result['host_aug_images_per_s'] = host_total

  cfg.augment = 'device'
  train, _, info = input_pipeline.get_datasets(cfg, global_batch_size=bs,
                                               seed=0)  # Decoded: cached.
  host_only, device_total = run(train, 'device')
  result['device_aug_iterator_images_per_s'] = host_only
  result['device_aug_images_per_s'] = device_total

  print(json.dumps(result))
  return 0


# ------------------------------------------------------------ --imagenet

# Long side of the generated images: ImageNet's train JPEGs are mostly 500 px
# on the long side (Flickr's 'medium' size), many smaller, a few camera-size;
# mostly quality ~96 without chroma subsampling. These fractions give a mean
# of about 395x355 px and ~130 kB per file (ImageNet: ~400x350, ~110 kB).
_LARGE = (0.01, 1000, 2500)  # Fraction, long-side range.
_SMALL = (0.55, 150, 499)
_MODE = 500
_LARGE_SIDE = 1000  # Images with a side this long count as 'large'.
# --jpeg: Pillow's save arguments. Noise sigma keeps ~0.8 bytes per pixel at
# q96-444 (ImageNet's ~110 kB per ~400x350 image); the same content at
# q90-420 gives smaller files, as re-encoding a photo would.
_JPEG = {'q96-444': dict(quality=96, subsampling=0),
         'q90-420': dict(quality=90, subsampling=2)}


def _image_sizes(n: int, rng) -> list[tuple[int, int]]:
  """``n`` (height, width) pairs with ImageNet-like statistics (above)."""
  import math  # pylint: disable=g-import-not-at-top
  sizes = []
  for _ in range(n):
    u = rng.random()
    if u < _LARGE[0]:
      long = int(rng.integers(_LARGE[1], _LARGE[2] + 1))
    elif u < _LARGE[0] + _SMALL[0]:
      long = int(rng.integers(_SMALL[1], _SMALL[2] + 1))
    else:
      long = _MODE
    aspect = math.exp(rng.uniform(0.0, math.log(1.6)))
    short = max(32, round(long / aspect))
    sizes.append((short, long) if rng.random() < 0.75 else (long, short))
  return sizes


def _make_folder(root: str, n: int, jpeg: str = 'q96-444') -> list[str]:
  """``n`` JPEGs of ImageNet-like sizes and content in 10 class folders."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  paths = []
  for i, (h, w) in enumerate(_image_sizes(n, rng)):
    # Photo-like: smooth blobs of colour (drawn at 1/8 size and upsampled,
    # cheap for large images) plus sensor-like noise. The noise sets the
    # entropy: sigma 5 at quality 96, 4:4:4 gives ~0.8 bytes per pixel,
    # ImageNet's ~110 kB per ~400x350 image; pure noise would make decoding
    # unrealistically slow, flat colour too fast.
    sh, sw = max(8, h // 8), max(8, w // 8)
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    img = np.zeros((sh, sw, 3), np.float32)
    for _ in range(6):
      cy, cx, r = rng.uniform(0, sh), rng.uniform(0, sw), rng.uniform(4, 25)
      img += rng.uniform(0, 255, 3) * np.exp(
          -((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None]
    img = Image.fromarray((img / max(1.0, img.max() / 255)).astype(np.uint8))
    img = np.asarray(img.resize((w, h), Image.BILINEAR), np.float32)
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
    d = os.path.join(root, 'train', f'n{i % 10:08d}')
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f'{i:06d}.JPEG')
    Image.fromarray(img).save(path, **_JPEG[jpeg])
    paths.append(path)
  return paths


def _folder_stats(paths: list) -> dict:
  """Mean size, share of large images and mean file size of ``paths``."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  sizes = []
  for p in paths:
    with Image.open(p) as im:
      sizes.append(im.size)
  sizes = np.array(sizes)
  return {'mean_width': round(float(sizes[:, 0].mean()), 1),
          'mean_height': round(float(sizes[:, 1].mean()), 1),
          'large_fraction': round(float(
              (sizes.max(1) >= _LARGE_SIDE).mean()), 3),
          'mean_kb': round(float(np.mean(
              [os.path.getsize(p) for p in paths])) / 1e3, 1)}


def _status_mb(field: str) -> float:
  with open('/proc/self/status') as fh:
    for line in fh:
      if line.startswith(field + ':'):
        return int(line.split()[1]) / 1024
  raise KeyError(field)


def _reset_peak_rss():
  """Resets this process's peak RSS (Linux), so that the peak read later is
  the decoding's, not the imports'; returns the RSS now (None: cannot)."""
  try:
    with open('/proc/self/clear_refs', 'w') as fh:
      fh.write('5')
    return _status_mb('VmRSS')
  except OSError:
    return None


def _per_image(method: str, paths: list, size: int, core: int, queue):
  """Runs one method over ``paths`` in this (fresh) process, on one core;
  puts (images/s, images/s on the images that are not large, peak RSS,
  growth of the peak RSS while decoding)."""
  import resource  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from cmim_jax.data import augment  # pylint: disable=g-import-not-at-top
  from cmim_jax.data import decode  # pylint: disable=g-import-not-at-top
  if hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, {core})

  def baseline(data, rng):
    # torchvision's ImageFolder loader (open + convert('RGB')), then
    # RandomResizedCrop (crop + resize, bilinear) and RandomHorizontalFlip.
    import io  # pylint: disable=g-import-not-at-top
    with Image.open(io.BytesIO(data)) as im:
      im = im.convert('RGB')
      top, left, h, w = augment.sample_resized_crop_box(rng, im.height,
                                                        im.width)
      im = im.crop((left, top, left + w, top + h)).resize(
          (size, size), Image.BILINEAR)
      if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
      return np.asarray(im)

  def decode_only(data, rng):
    # Full-size decode alone: the floor of any method that decodes fully.
    del rng
    import io  # pylint: disable=g-import-not-at-top
    with Image.open(io.BytesIO(data)) as im:
      im.load()

  def ours(reduced, partial):
    return lambda data, rng: decode.decode_crop(
        data, 'bench', size=size, rng=rng, reduced=reduced, partial=partial)

  if method == 'stream_pillow_resize':
    os.environ['CMIM_JPEG_RESIZE'] = '0'  # This process only.

  def window_decode_only(data, rng):
    # stream's decode without its resize: the same window and scale, into
    # the packed region buffer decode_resize decodes into.
    import io  # pylint: disable=g-import-not-at-top
    from cmim_jax.data import jpeg_crop  # pylint: disable=g-import-not-at-top
    with Image.open(io.BytesIO(data)) as im:
      (width, height), mode = im.size, im.mode
    top, left, h, w, _ = decode.crop_window(rng, height, width, 0.875)
    denom, scaled, box = decode.scale_and_box(width, height,
                                              (top, left, h, w), size)
    return jpeg_crop.decode_region(
        data, denom=denom, scaled_size=scaled,
        channels=decode.shim_channels(mode),
        window=decode.read_window(box, scaled, size))

  fn = {'pil_baseline': baseline, 'decode_only': decode_only,
        'stream_full_decode': ours(False, False),
        'stream_pil': ours(True, False), 'stream': ours(True, None),
        'stream_pillow_resize': ours(True, None),
        'window_decode_only': window_decode_only}[method]
  blobs, large = [], []
  for p in paths:  # Bytes in memory: the rate is decode + crop, not disk.
    with open(p, 'rb') as fh:
      blobs.append(fh.read())
    with Image.open(p) as im:
      large.append(max(im.size) >= _LARGE_SIDE)
  for i, b in enumerate(blobs[:10]):  # Warm-up.
    fn(b, np.random.default_rng(i))
  before = _reset_peak_rss()
  seconds = np.zeros(len(blobs))
  for i, b in enumerate(blobs):
    # CPU time, not wall time: on a shared machine the time this process
    # waits for a core would otherwise count as decoding time.
    start = time.process_time()
    fn(b, np.random.default_rng(i))
    seconds[i] = time.process_time() - start
  large = np.array(large)
  growth = _status_mb('VmHWM') - before if before is not None else None
  queue.put((len(blobs) / seconds.sum(),
             (~large).sum() / seconds[~large].sum(),
             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             growth))


def _pipeline(root: str, size: int, workers: int, batch: int, steps: int):
  """Images/s and peak RSS (main + workers) of the streaming pipeline."""
  import psutil  # pylint: disable=g-import-not-at-top
  from cmim_jax import default_config  # pylint: disable=g-import-not-at-top
  from cmim_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  cfg = default_config.data_config()
  cfg.update(dict(name='bench', source='folder', data_dir=root,
                  train_split='train', eval_split='', pipeline='stream',
                  augment='host', image_size=size, workers=workers,
                  prefetch=2))
  train, _, _ = input_pipeline.get_datasets(cfg, global_batch_size=batch,
                                            seed=0)
  me = psutil.Process()
  peak = 0.0
  it = train.iterator(0, num_steps=steps + 1)
  next(it)  # Workers started, first batch built.
  start = time.perf_counter()
  for _ in it:
    rss = me.memory_info().rss + sum(
        c.memory_info().rss for c in me.children(recursive=True))
    peak = max(peak, rss / 2**20)
  seconds = time.perf_counter() - start
  return steps * batch / seconds, peak


METHODS = ('pil_baseline', 'decode_only', 'stream_full_decode', 'stream_pil',
           'stream_pillow_resize', 'stream', 'window_decode_only')


def imagenet_main(args) -> int:
  import multiprocessing  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import statistics  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  cores = len(os.sched_getaffinity(0)) if hasattr(
      os, 'sched_getaffinity') else os.cpu_count()
  tmp = None
  if args.folder:
    root = os.path.realpath(args.folder)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root)
                   for f in fs if f.lower().endswith(('.jpg', '.jpeg')))
    paths = paths[:args.images]
  else:
    tmp = tempfile.mkdtemp(prefix='cmim_bench_')
    root = tmp
    paths = _make_folder(root, args.images, args.jpeg)
  from cmim_jax.data import jpeg_crop  # pylint: disable=g-import-not-at-top
  result = {'benchmark': 'input_pipeline_imagenet', 'images': len(paths),
            'jpeg': 'folder' if args.folder else args.jpeg,
            'partial_decode': jpeg_crop.available() or
                              jpeg_crop.unavailable_reason(),
            **_folder_stats(paths), 'size': args.size, 'cores': cores,
            'rounds': args.rounds,
            'loadavg_1min_start': round(os.getloadavg()[0], 2)}
  try:
    ctx = multiprocessing.get_context('spawn')
    core = sorted(os.sched_getaffinity(0))[-1] if hasattr(
        os, 'sched_getaffinity') else 0
    # Rounds of every method in turn (A B C D A B C D ...): the speed-up is
    # the median of per-round ratios, which a drifting load moves less.
    methods = ['pil_baseline'] + [
        m for m in args.methods.split(',') if m and m != 'pil_baseline']
    unknown = set(methods) - set(METHODS)
    if unknown:
      raise SystemExit(f'--methods: unknown {sorted(unknown)}; known: '
                       f'{", ".join(METHODS)}')
    runs = {m: [] for m in methods}
    for _ in range(args.rounds):
      for method in methods:
        q = ctx.Queue()
        p = ctx.Process(target=_per_image,
                        args=(method, paths, args.size, core, q))
        p.start()
        runs[method].append(q.get())
        p.join()
    for method in methods:
      rates, typical, rss, growth = zip(*runs[method])
      result[f'{method}_images_per_s_per_core'] = round(
          statistics.median(rates), 1)
      result[f'{method}_not_large_images_per_s_per_core'] = round(
          statistics.median(typical), 1)
      result[f'{method}_peak_rss_mb'] = round(max(rss), 1)
      # The process's imports and the files' bytes are most of the peak;
      # this is what decoding added on top.
      if None not in growth:
        result[f'{method}_decode_rss_growth_mb'] = round(max(growth), 1)
    base = runs['pil_baseline']
    for method, key in (('stream', 'speedup_vs_pil'),
                        ('stream_pil', 'stream_pil_vs_pil'),
                        ('stream_pillow_resize',
                         'stream_pillow_resize_vs_pil'),
                        ('decode_only', 'decode_only_vs_pil')):
      if method not in runs:
        continue
      result[key] = round(statistics.median(
          r[0] / b[0] for r, b in zip(runs[method], base)), 2)
      result[key + '_not_large'] = round(statistics.median(
          r[1] / b[1] for r, b in zip(runs[method], base)), 2)
    if 'stream' in runs and 'stream_pillow_resize' in runs:
      # What the shim's own resize adds, paired by round.
      result['stream_vs_stream_pillow_resize'] = round(statistics.median(
          r[0] / b[0] for r, b in zip(runs['stream'],
                                      runs['stream_pillow_resize'])), 2)
    if not args.folder and args.workers >= 0:
      workers = args.workers or cores
      batch = args.batch_size
      steps = max(1, (2 * len(paths)) // batch)
      rate, peak = _pipeline(root, args.size, workers, batch, steps)
      result.update({'pipeline_workers': workers, 'pipeline_batch': batch,
                     'pipeline_images_per_s': round(rate, 1),
                     'pipeline_images_per_s_per_worker': round(
                         rate / workers, 1),
                     'pipeline_peak_rss_mb': round(peak, 1)})
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  result['loadavg_1min_end'] = round(os.getloadavg()[0], 2)
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
