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

import abc
import functools
from typing import Mapping

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


class IndexedDataset(abc.ABC):
  """Shared batching over `num_examples` indexed rows: training batches by (seed, step),
  evaluation batches in order. Subclasses define `seed`, `num_examples` and
  `_eval_rows(indices, valid)` (valid: bool per row; False rows are fillers to ignore)."""

  seed: int
  num_examples: int

  def batch_indices(self, step: int, batch_size: int, process_index: int = 0,
                    process_count: int = 1) -> np.ndarray:
    """Example indices of this process's shard of the global batch at `step`."""
    pos = global_positions(step, batch_size, process_index, process_count)
    return train_indices(self.seed, pos, self.num_examples)

  def num_eval_batches(self, batch_size: int, process_count: int = 1,
                       drop_remainder: bool = False) -> int:
    return num_eval_batches(self.num_examples, batch_size, process_count, drop_remainder)

  def eval_batches(self, batch_size: int, num_batches: int | None = None,
                   process_index: int = 0, process_count: int = 1,
                   drop_remainder: bool = False):
    """Examples in order; the last batch is filled up with rows whose labels are all -100
    (ignored) unless drop_remainder. At most `num_batches` batches."""
    total = self.num_eval_batches(batch_size, process_count, drop_remainder)
    if num_batches is not None:
      total = min(total, int(num_batches))
    for b in range(total):
      idx, valid = eval_positions(b, batch_size, self.num_examples, process_index,
                                  process_count)
      yield self._eval_rows(idx, valid)

  @abc.abstractmethod
  def _eval_rows(self, indices: np.ndarray, valid: np.ndarray) -> dict:
    """The evaluation batch of these example indices."""


# --------------------------------------------------------------------------- eval batches
BATCH_KEYS = ('input_ids', 'attention_mask', 'token_type_ids', 'labels')
PAD_VALUES = {'labels': -100}   # labels the losses ignore (IGNORE_INDEX)


def pad_batch(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Keep the model/loss keys and pad to `rows` rows (padding rows: mask 0, labels -100)."""
  out = {}
  for k in BATCH_KEYS:
    if k not in batch:
      continue
    v = np.asarray(batch[k])
    n = v.shape[0]
    if n < rows:
      pad = np.full((rows - n,) + v.shape[1:], PAD_VALUES.get(k, 0), v.dtype)
      v = np.concatenate([v, pad], axis=0)
    out[k] = v
  return out
