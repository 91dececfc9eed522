"""Guards of the training and evaluation loops: non-finite loss / gradient handling
(config.nonfinite), finiteness checks before anything is saved, and batch checks.

The train step returns a per-step `finite` flag and never applies a non-finite update (see
oqt_jax/train/step.py). The loop reads the flags only where it synchronises with the device
anyway (logging, before a checkpoint save, evaluation, the end), hands them to
`NonFiniteMonitor.check`, and stops with `NonFiniteError` when the policy says so:

  nonfinite='stop'  the first non-finite step stops the run; nothing after the last
                    checkpoint whose steps were all finite is saved;
  nonfinite='skip'  the update of a non-finite step is skipped (counted as `skipped_steps`
                    in the logged train records); `max_skipped_steps` in a row stop the run.

`nonfinite_leaves(tree)` guards the checkpoint and HF export paths: a
state with a NaN or Inf is never written. `check_batch` rejects token ids outside the
vocabulary and sequences longer than the position table on the host (an out-of-range lookup
would otherwise silently read NaN).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from oqt_jax.errors import DataError, NonFiniteError


def _is_float(x) -> bool:
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.inexact)


@jax.jit
def _leaf_flags(leaves):
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]) if leaves else jnp.ones((0,), bool)


def nonfinite_leaves(tree) -> list[str]:
  """Paths ('params/decoder/fc1/kernel') of the floating-point leaves holding a NaN or Inf.
  Computed on the device (one small transfer), so sharded / multi-host arrays work too."""
  flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if _is_float(x)]
  if not flat:
    return []
  flags = np.asarray(jax.device_get(_leaf_flags([x for _, x in flat])))
  return ['/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in p)
          for (p, _), ok in zip(flat, flags) if not ok]


def _fmt(x) -> str:
  x = float(x)
  return repr(x) if not math.isfinite(x) else f'{x:.4g}'


class NonFiniteMonitor:
  """Applies config.nonfinite to the per-step metrics, in step order."""

  def __init__(self, mode: str = 'stop', max_skipped: int = 10):
    self.mode, self.max_skipped = mode, int(max_skipped)
    self.in_a_row = 0       # non-finite steps in a row so far (carried across windows)
    self.skipped = 0        # skipped steps in total (this process's run)
    self.last_checked = 0   # last step whose flag has been seen

  def check(self, steps: Sequence[int], metrics: Sequence[dict]) -> None:
    """`metrics[i]` (host values) belongs to step `steps[i]` (1-based, as logged); raises
    NonFiniteError when the run must stop. Steps already checked are ignored."""
    for step, m in zip(steps, metrics):
      if step <= self.last_checked:
        continue
      self.last_checked = step
      if float(m.get('finite', 1.0)) > 0:
        self.in_a_row = 0
        continue
      what = self.describe(m)
      if self.mode != 'skip':
        raise NonFiniteError(f"step {step}: {what}; stopped (config.nonfinite='stop'): the "
                             'update was not applied and nothing after the last checkpoint is '
                             'saved')
      self.in_a_row += 1
      self.skipped += 1
      if self.in_a_row >= self.max_skipped:
        raise NonFiniteError(f'step {step}: {what}, {self.in_a_row} non-finite steps in a row '
                             f'(config.max_skipped_steps={self.max_skipped}); stopped')

  @staticmethod
  def describe(m: dict) -> str:
    loss, gn = float(m.get('loss', math.nan)), float(m.get('grad_norm', math.nan))
    if not math.isfinite(loss):
      return f'non-finite loss ({_fmt(loss)}, grad_norm {_fmt(gn)})'
    if not math.isfinite(gn):
      return f'non-finite gradient (loss {_fmt(loss)}, grad_norm {_fmt(gn)})'
    return f'non-finite parameter update (loss {_fmt(loss)}, grad_norm {_fmt(gn)})'


def window_record(ms: Sequence[dict]) -> dict[str, float]:
  """The logged train record of a window of per-step host metrics: means over the finite
  steps (all steps when none is finite), lr of the last step, tokens summed, window_steps
  (steps the record covers) and skipped_steps (non-finite steps in it)."""
  if not ms:
    return {}
  ok = [m for m in ms if float(m.get('finite', 1.0)) > 0]
  use = ok or list(ms)
  out = {}
  for k in ms[-1]:
    if k == 'finite':
      continue
    out[k] = float(np.mean([np.asarray(m[k]) for m in use]))
  out['lr'] = float(np.asarray(ms[-1]['lr']))
  out['tokens'] = float(np.sum([np.asarray(m['tokens']) for m in ms]))
  out['window_steps'] = len(ms)
  out['skipped_steps'] = len(ms) - len(ok)
  return out


def check_batch(batch, vocab_size: int, max_positions: Optional[int] = None,
                where: str = 'batch') -> None:
  """DataError naming the problem when a host batch's input_ids leave [0, vocab_size) or
  its sequences are longer than the model's `max_positions`."""
  ids = batch.get('input_ids') if hasattr(batch, 'get') else None
  if ids is None:
    return
  ids = np.asarray(ids)
  if ids.size == 0:
    raise DataError(f'{where}: empty input_ids (shape {ids.shape})')
  if not np.issubdtype(ids.dtype, np.integer):
    raise DataError(f'{where}: input_ids must be integers, got {ids.dtype}')
  lo, hi = int(ids.min()), int(ids.max())
  if lo < 0 or hi >= vocab_size:
    bad = lo if lo < 0 else hi
    raise DataError(f'{where}: token id {bad} outside the vocabulary [0, '
                    f'model.vocab_size={vocab_size})')
  if max_positions is not None and ids.shape[-1] > max_positions:
    raise DataError(f'{where}: sequences of {ids.shape[-1]} tokens are longer than '
                    f'model.max_position_embeddings={max_positions}')
