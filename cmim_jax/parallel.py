"""The parallel wrapper around a per-device step, chosen at the edge.

A step is written once, per device, against the named axis ``'data'`` and its
collectives (``pmean``, ``psum``, ``all_gather``). :class:`Parallel` runs it

* under ``jax.shard_map`` + ``jit`` on a 1-D mesh of all devices (default), the
  state replicated (``P()``) and the batch split over ``'data'``; or
* under ``jax.pmap`` over the local devices (``parallel='pmap'``), the state
  carrying a leading device axis.

Both give the same numbers (``tests/test_train.py`` checks it). The canonical
form of the state, used for checkpoints, is the replicated global array of the
shard_map layout; :meth:`Parallel.to_step_layout` / :meth:`from_step_layout`
convert.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "data"
MODES = ("shard_map", "pmap")


@dataclasses.dataclass(frozen=True)
class Parallel:
  """Runs per-device functions over all devices in one of :data:`MODES`."""
  mode: str = "shard_map"
  axis_name: str = AXIS
  num_devices: int | None = None  # None: every device (of every process).

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"config.parallel={self.mode!r} is not one of {MODES}.")

  @functools.cached_property
  def mesh(self) -> jax.sharding.Mesh:
    # Auto axes: jit moves host batches and replicated state into place itself.
    return jax.make_mesh((self.device_count,), (self.axis_name,),
                         axis_types=(jax.sharding.AxisType.Auto,),
                         devices=self.devices)

  @property
  def devices(self) -> list:
    if self.num_devices is None:
      return jax.devices()
    if jax.process_count() > 1 or self.num_devices > jax.device_count():
      raise ValueError(f"num_devices={self.num_devices} needs a single process with at "
                       f"least that many devices ({jax.device_count()} here).")
    return jax.devices()[:self.num_devices]

  @property
  def device_count(self) -> int:
    return len(self.devices)

  @property
  def local_devices(self) -> list:
    return [d for d in self.devices if d.process_index == jax.process_index()]

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(self.axis_name))

  def check_batch_size(self, global_batch: int, what: str = "batch_size") -> None:
    n = self.device_count
    if global_batch % n:
      raise ValueError(
          f"config.{what}={global_batch} is not divisible by the {n} devices; "
          f"use a multiple of {n}.")

  def map(self, fn: Callable, *, n_replicated: int, n_batch: int,
          donate_state: bool = False) -> Callable:
    """Wraps ``fn(*replicated_args, *batch_args)`` (outputs replicated).

    The training and evaluation steps are wrapped by ``train.make_steps``;
    this is the general form, for other per-device functions.

    Args:
      fn: per-device function; its first ``n_replicated`` arguments are the same
        on every device (the state), the next ``n_batch`` are split over the
        batch axis.
      n_replicated: how many leading arguments are replicated.
      n_batch: how many following arguments are batch-sharded.
      donate_state: donate the first argument's buffers.
    """
    donate = (0,) if donate_state else ()
    if self.mode == "pmap":
      return jax.pmap(fn, axis_name=self.axis_name, donate_argnums=donate,
                      devices=self.local_devices if self.num_devices else None)
    specs = (P(),) * n_replicated + (P(self.axis_name),) * n_batch
    # check_vma=False keeps pmap's gradient semantics: grads of replicated
    # parameters stay per-device (no implicit psum), and the step pmeans them.
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=P(),
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=donate)

  # --- layouts -------------------------------------------------------------

  def replicate_global(self, tree: Any) -> Any:
    """Host values (the same on every process) -> replicated global arrays."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)),
        tree)

  def to_step_layout(self, tree: Any) -> Any:
    """Canonical (replicated global) state -> the layout the step expects."""
    if self.mode == "shard_map":
      return tree
    devices = self.local_devices
    stacked = NamedSharding(jax.sharding.Mesh(np.array(devices), (self.axis_name,)),
                            P(self.axis_name))
    def rep(x):
      x = first_copy_to_host(x)
      return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape), stacked)
    return jax.tree.map(rep, tree)

  def from_step_layout(self, tree: Any) -> Any:
    """The step's layout -> canonical replicated global arrays."""
    if self.mode == "shard_map":
      return tree
    return self.replicate_global(jax.tree.map(lambda x: np.asarray(x[0]), tree))

  def batch_input(self, batch: dict[str, np.ndarray]) -> Any:
    """A process-local batch -> the step's batch argument."""
    if self.mode == "pmap":
      n = len(self.local_devices)
      def split(x):
        if x.shape[0] % n:
          raise ValueError(f"local batch of {x.shape[0]} does not split over {n} local devices.")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])
      return jax.tree.map(split, batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch)

  def output(self, tree: Any) -> Any:
    """A replicated step output -> one copy (still on device)."""
    if self.mode == "pmap":
      return jax.tree.map(lambda x: x[0], tree)
    return tree


def first_copy_to_host(tree: Any) -> Any:
  """Replicated (global) arrays -> numpy, reading only the local copy."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)
