"""Orbax checkpoints in workdir/checkpoints: periodic async saves, keep-last-K, save on exit,
resume from the newest *readable* step.

A step dir that fails to restore (truncated or garbled file, half-written save) is reported
in one line naming it, moved aside to workdir/checkpoints_corrupt/, and the previous step
is tried. Restoring takes an abstract target with shardings, so a checkpoint written on one
mesh restores onto any other mesh shape or device count.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from oqt_jax import models
from oqt_jax.errors import CheckpointError, NonFiniteError
from oqt_jax.train.guards import nonfinite_leaves

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'


def _report(msg: str):
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def _one_line(e: BaseException, limit: int = 160) -> str:
  text = ' '.join(str(e).split())
  text = text.split(' See full TensorStore details')[0]
  text = text[:limit] + ('...' if len(text) > limit else '')
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def flat_shapes(tree) -> dict[str, tuple]:
  """{'params/decoder_layer_0/fc1/kernel': shape, ...} for arrays, ShapeDtypeStructs or
  Orbax array metadata (containers normalised: NamedTuple fields and dict keys alike)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[_path_str(path)] = tuple(getattr(leaf, 'shape', ()) or ())
  return out


def structure_mismatch(meta: Any, target: Any) -> Optional[str]:
  """None if the checkpoint metadata has the target's arrays and shapes, else the first
  difference in words."""
  if meta is None:
    return None
  have, want = flat_shapes(meta), flat_shapes(target)
  for k in sorted(want):
    if k not in have:
      return f'{k} missing from the checkpoint'
    if tuple(have[k]) != tuple(want[k]):
      return f'{k} has shape {tuple(have[k])} in the checkpoint, {tuple(want[k])} here'
  extra = sorted(set(have) - set(want))
  if extra:
    return f'{extra[0]} is in the checkpoint but not in this run'
  return None


def missing_items(meta: Any, target: Any) -> frozenset:
  """The top-level items of `target` of which the checkpoint has no array at all (e.g.
  'quant' for a floating-point checkpoint restored into a QAT state)."""
  if meta is None:
    return frozenset()
  top = lambda d: {k.split('/', 1)[0] for k in d}
  return frozenset(top(flat_shapes(target)) - top(flat_shapes(meta)))


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager for one pytree item (a dict of arrays)."""

  def __init__(self, workdir: str, *, keep: int, every: int, async_save: bool = True):
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    self.keep, self.every, self.async_save = int(keep), int(every), bool(async_save)
    self._manager = self._open()
    self._requested: set[int] = set()

  def _open(self) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep, create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=self.async_save)
    try:
      return ocp.CheckpointManager(self.directory, options=opts,
                                   item_handlers=ocp.StandardCheckpointHandler())
    except Exception as e:  # unreadable directory, permissions, ...
      raise CheckpointError(f'{self.directory}: cannot open checkpoint directory '
                            f'({_one_line(e)})') from e

  # ------------------------------------------------------------------ queries
  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # ------------------------------------------------------------------ save
  def due(self, step: int) -> bool:
    """Whether save(step, ...) would write a periodic checkpoint."""
    step = int(step)
    return step % self.every == 0 and step not in self._requested

  def save(self, step: int, items: Any, *, force: bool = False) -> bool:
    """Save `items` at `step` (async) when the interval says so or `force`; returns saved?

    Never writes a NaN / Inf (NonFiniteError naming the array). A failed write (disk full,
    permissions, an earlier async save that failed) raises CheckpointError naming the step
    dir; the previous checkpoints stay as they were."""
    step = int(step)
    if not force and step % self.every:
      return False
    if step in self._requested or step in self._manager.all_steps():
      return False
    bad = nonfinite_leaves(items)
    if bad:
      raise NonFiniteError(f'step {step}: non-finite values in {bad[0]} ({len(bad)} array(s)); '
                           f'checkpoint not written')
    # The interval is decided here (Orbax would also save the very first step it sees).
    try:
      saved = self._manager.save(step, args=ocp.args.StandardSave(items), force=True)
    except Exception as e:
      raise self._save_error(step, e) from e
    if saved:
      self._requested.add(step)
    return saved

  def _save_error(self, step: int, e: BaseException) -> CheckpointError:
    try:   # an earlier save still in flight: let it finish before naming the one kept
      self._manager.wait_until_finished()
    except Exception:
      pass
    prev = [s for s in self._committed_steps() if s < step]
    kept = (f'the previous checkpoint {self.step_dir(prev[-1])} is kept' if prev
            else 'no earlier checkpoint')
    return CheckpointError(f'{self.step_dir(step)}: checkpoint save failed ({_one_line(e)}); '
                           f'{kept}')

  def _committed_steps(self) -> list[int]:
    try:
      return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
    except OSError:
      return []

  def wait(self):
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(max(self._requested, default=0), e) from e

  def close(self):
    try:
      self.wait()
    finally:
      self._manager.close()

  # ------------------------------------------------------------------ restore
  def restore(self, step: int, target: Any) -> Any:
    return self._manager.restore(int(step), args=ocp.args.StandardRestore(target))

  def restore_latest(self, target: Any, validate: Callable[[Any, int], None] | None = None
                     ) -> tuple[Optional[Any], Optional[int]]:
    """(items, step) from the newest step that restores (and passes `validate`), or
    (None, None) when there is no checkpoint. Unreadable steps are reported and moved
    aside; if every step is unreadable, CheckpointError."""
    steps = self.all_steps()
    if not steps:
      return None, None
    bad = []
    for step in reversed(steps):
      try:
        meta = self._manager.item_metadata(step)
      except Exception as e:
        _report(f'warning: checkpoint {self.step_dir(step)} is corrupt or incomplete '
                f'({_one_line(e)}); trying the previous one')
        bad.append(step)
        continue
      mismatch = structure_mismatch(meta, target)
      if mismatch:   # a different model / optimizer, not a damaged file: stop, touch nothing
        err = CheckpointError(f'{self.step_dir(step)}: does not match this run ({mismatch}); '
                              'use the config it was written with or a new --workdir')
        err.missing_items = missing_items(meta, target)
        raise err
      try:
        items = self.restore(step, target)
        if validate is not None:
          validate(items, step)
        if bad:
          _report(f'resuming from the previous checkpoint {self.step_dir(step)}')
          self._quarantine(bad)   # so that later saves of those steps are not skipped
        return items, step
      except Exception as e:  # orbax/tensorstore raise many types for a damaged step
        _report(f'warning: checkpoint {self.step_dir(step)} is corrupt or incomplete '
                f'({_one_line(e)}); trying the previous one')
        bad.append(step)
    self._quarantine(bad)
    raise CheckpointError(f'{self.directory}: no readable checkpoint (tried steps '
                          f'{", ".join(map(str, bad))}); move the directory away to start over')

  def _quarantine(self, steps):
    if not steps:
      return
    if jax.process_index() == 0:
      dest_root = os.path.join(self.workdir, CORRUPT_DIR)
      os.makedirs(dest_root, exist_ok=True)
      for s in steps:
        src = self.step_dir(s)
        dest = os.path.join(dest_root, f'{s}-{time.strftime("%Y%m%d-%H%M%S")}')
        try:
          shutil.move(src, dest)
          _report(f'moved unreadable checkpoint {src} to {dest}')
        except OSError as e:
          _report(f'warning: could not move {src} aside ({_one_line(e)})')
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('oqt_jax_checkpoint_quarantine')
    self._manager.close()
    self._manager = self._open()


def load_orbax(config, workdir: str):
  """Parameters of the newest Orbax step in workdir/checkpoints; model config from the run's
  workdir/config.json (written by the training loop, sized to its tokenizer) if present."""
  mcfg = config.model
  saved = os.path.join(workdir, 'config.json')
  if os.path.exists(saved):
    try:
      with open(saved) as fh:
        mcfg = json.load(fh).get('model', mcfg)
    except (OSError, json.JSONDecodeError) as e:
      raise CheckpointError(f'{saved}: cannot be read ({type(e).__name__})') from e
  model = models.build(mcfg)
  ckpt_dir = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  try:
    mngr = ocp.CheckpointManager(ckpt_dir)
    step = mngr.latest_step()
    items = mngr.restore(step, args=ocp.args.StandardRestore())
  except Exception as e:   # orbax / tensorstore raise many types
    text = ' '.join(str(e).split())[:160]
    raise CheckpointError(f'{ckpt_dir}: cannot restore the newest step '
                          f'({type(e).__name__}: {text})') from e
  params = items.get('params') if isinstance(items, dict) else None
  if params is None:
    raise CheckpointError(f'{ckpt_dir}/{step}: no params in the checkpoint')
  expect = jax.eval_shape(lambda r: models.init_variables(model, r)['params'],
                          jax.random.PRNGKey(0))
  want = {jax.tree_util.keystr(p): l.shape for p, l in
          jax.tree_util.tree_flatten_with_path(expect)[0]}
  got = {jax.tree_util.keystr(p): np.shape(l) for p, l in
         jax.tree_util.tree_flatten_with_path(params)[0]}
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:2]
    raise CheckpointError(f'{ckpt_dir}/{step}: parameters do not match the model config '
                          f'(first differences: {diff})')
  return model, {'params': params}
