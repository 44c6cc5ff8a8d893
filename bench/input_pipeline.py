"""Input pipeline throughput on CIFAR-10 from the shared JPEG archive.

Times (1) decoding the 50,000 JPEGs of cifar10-train.tar.gz once into
memory, then augmented batches of 128 (2) with host augmentation (numpy
pad-crop-flip in the iterator, then transfer and on-device normalisation)
and (3) with device augmentation (uint8 gather on the host, transfer, jitted
``preprocess_on_device`` doing crop, flip and normalisation). The last line
printed is a JSON object.

Run:
  .venv/bin/python bench/input_pipeline.py [--data PATH] [--batches 200]
"""

import argparse
import json
import os
import sys
import time

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # Runs from a checkout without installing.

from cmim_jax import default_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from cmim_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position


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
  args = parser.parse_args(argv)

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


if __name__ == '__main__':
  sys.exit(main())
