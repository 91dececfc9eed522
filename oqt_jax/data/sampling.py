"""Which examples make up a batch: a pure function of (seed, step, process).

Training order: the examples are visited epoch by epoch, each epoch in the order of
`np.random.default_rng((seed, epoch)).permutation(n)`. The global stream position of row r of
the global batch at `step` is g = step * global_batch + r, with
global_batch = batch_size * process_count; it lies in epoch g // n at position g % n. Process
p reads rows [p * batch_size, (p + 1) * batch_size) of every global batch, so the processes'
shards are disjoint and together give exactly the single-process batch of the same global size.
A batch that straddles an epoch boundary takes the end of one permutation and the start of
the next, so no example is skipped or repeated within an epoch.
"""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=3)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The visiting order of epoch `epoch` (cached: a batch touches at most two epochs)."""
  perm = np.random.default_rng((int(seed), int(epoch))).permutation(n)
  if n < 2**31:
    perm = perm.astype(np.int32)
  perm.setflags(write=False)
  return perm


def global_positions(step: int, batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> np.ndarray:
  """Stream positions g of this process's rows of the global batch at `step`."""
  if batch_size <= 0:
    raise ValueError(f'batch_size={batch_size}: must be positive')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index}: not in [0, process_count={process_count})')
  if step < 0:
    raise ValueError(f'step={step}: must be >= 0')
  start = (int(step) * process_count + process_index) * batch_size
  return np.arange(start, start + batch_size, dtype=np.int64)


def train_indices(seed: int, positions: np.ndarray, n: int) -> np.ndarray:
  """Example indices at stream positions `positions` under the epoch-wise shuffle."""
  if n <= 0:
    raise ValueError('the dataset has no examples')
  epochs, offsets = np.divmod(positions, n)
  out = np.empty(positions.shape, dtype=np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = epoch_permutation(seed, int(e), n)[offsets[sel]]
  return out


def eval_positions(batch_index: int, batch_size: int, n: int, process_index: int = 0,
                   process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Eval rows in file order: (example indices, valid mask); rows past the end are invalid.

  Invalid rows reuse example indices from the start so the arrays stay well-formed; their
  labels are set to -100 by the caller.
  """
  pos = global_positions(batch_index, batch_size, process_index, process_count)
  valid = pos < n
  return np.where(valid, pos, pos % max(n, 1)), valid


def num_eval_batches(n: int, batch_size: int, process_count: int = 1,
                     drop_remainder: bool = False) -> int:
  gb = batch_size * process_count
  return n // gb if drop_remainder else -(-n // gb)
