"""Split strings with tfds slicing semantics, applied to any source.

The parsing is tfds's own (``tfds.core.ReadInstruction.from_spec``, which
needs no TensorFlow); this module only feeds it the split sizes of whatever
source holds the data, so that ``train[:90%]`` means the same rows for a tfds
dataset, a CIFAR pickle archive, an image folder or the digits demo.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

ACCEPTED_FORMS = (
    "'train', 'test', 'train[:45000]', 'train[45000:]', 'train[-5000:]', "
    "'train[:90%]', 'train[10%:20%]', or several joined with '+' "
    "('train[:10%]+test')")


@dataclasses.dataclass(frozen=True)
class _SplitSize:
  """The two attributes of ``tfds.core.SplitInfo`` that slicing reads."""
  num_examples: int

  @property
  def shard_lengths(self) -> list[int]:
    # Non-tfds sources are one shard; `train[0shard]` then means all of it.
    return [self.num_examples]


def _parse(spec: str):
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(
        f'Split must be a non-empty string, got {spec!r}. Accepted forms: '
        f'{ACCEPTED_FORMS}.')
  # Imported here: tensorflow_datasets is slow to import and only the
  # pipeline's builder needs it, not every importer of input_pipeline.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    parsed = tfds.core.ReadInstruction.from_spec(spec.strip())
  except (ValueError, NotImplementedError) as e:
    raise ValueError(
        f'Cannot parse split string {spec!r}: {e}\nAccepted forms: '
        f'{ACCEPTED_FORMS}.') from None
  return parsed


def _names(parsed) -> list[str]:
  # A parsed spec is a binary tree of `+` nodes (left/right) over
  # ReadInstruction leaves; `all` is a leaf without a split name.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if isinstance(parsed, tfds.core.ReadInstruction):
    return [parsed.split_name]
  if hasattr(parsed, 'left') and hasattr(parsed, 'right'):
    return _names(parsed.left) + _names(parsed.right)
  raise ValueError(
      "Split 'all' is not supported: name the splits joined with '+', "
      "e.g. 'train+test'.")


def split_names(spec: str) -> list[str]:
  """Returns the split names a split string refers to, in order, unique.

  Args:
    spec: a tfds-style split string, e.g. ``'train[:90%]+test'``.

  Raises:
    ValueError: if ``spec`` cannot be parsed; the message names the string
      and the accepted forms.
  """
  return list(dict.fromkeys(_names(_parse(spec))))


def resolve_split(spec: str,
                  sizes: Mapping[str, int]) -> list[tuple[str, int, int]]:
  """Turns a split string into absolute ``(split_name, start, stop)`` pieces.

  Args:
    spec: a tfds-style split string.
    sizes: number of examples of every split the source has (at least those
      ``spec`` names).

  Returns:
    One ``(name, start, stop)`` per ``+``-joined part; rows ``start:stop`` of
    split ``name``, in order.

  Raises:
    ValueError: on a parse error, an unknown split name, a slice outside the
      split, or a selection with no examples.
  """
  parsed = _parse(spec)
  _names(parsed)  # Rejects 'all' with its own message.
  infos = {name: _SplitSize(int(n)) for name, n in sizes.items()}
  try:
    absolute = parsed.to_absolute(infos)
  except ValueError as e:
    raise ValueError(
        f'Split {spec!r} does not fit the data (split sizes '
        f'{dict(sizes)}): {e}') from None
  pieces = []
  for a in absolute:
    n = infos[a.splitname].num_examples
    start = 0 if a.from_ is None else a.from_
    stop = n if a.to is None else a.to
    if stop <= start:
      raise ValueError(
          f'Split {spec!r} selects no examples from {a.splitname!r} '
          f'({n} examples): rows {start}:{stop}.')
    pieces.append((a.splitname, start, stop))
  return pieces
