"""Metrics to TensorBoard event files (tensorboardX) and workdir/metrics.jsonl.

metrics.jsonl is append-only, one JSON object per line: {"step": N, "kind": "train"|"eval"|
"event", ...}. A rerun after a crash appends again from the resumed step, so a reader keeps
the last record per (kind, step): see `read_metrics`. Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

JSONL_NAME = 'metrics.jsonl'
TB_DIR = 'tensorboard'


def _plain(v):
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, 'item'):
    v = np.asarray(v).item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def _summary_writer_class():
  """tensorboardX.SummaryWriter, imported without dragging in PyTorch.

  tensorboardX imports torch whenever it is installed (only to recognise torch tensors),
  which costs seconds at every start-up; scalars do not need it. When torch is not already
  loaded it is hidden for the duration of the import and then made importable again.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None   # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, JSONL_NAME)
    self._fh = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # A kill -9 can leave a half-written last line: start on a fresh line.
    if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
      with open(self.path, 'rb') as fh:
        fh.seek(-1, os.SEEK_END)
        needs_newline = fh.read(1) != b'\n'
      if needs_newline:
        with open(self.path, 'a') as fh:
          fh.write('\n')
    self._fh = open(self.path, 'a', buffering=1)
    if tensorboard:
      try:
        self._tb = _summary_writer_class()(os.path.join(workdir, TB_DIR))
      except Exception:  # tensorboardX missing or unusable: JSONL still works
        self._tb = None

  def write(self, step: int, metrics: Mapping[str, Any], kind: str = 'train'):
    if not self.enabled:
      return
    rec = {'step': int(step), 'kind': kind, 'time': round(time.time(), 3)}
    rec.update({k: _plain(v) for k, v in metrics.items()})
    self._fh.write(json.dumps(rec) + '\n')
    if self._tb is not None:
      for k, v in rec.items():
        if k in ('step', 'kind', 'time') or not isinstance(v, (int, float)) or isinstance(v, bool):
          continue
        self._tb.add_scalar(f'{kind}/{k}', v, int(step))

  def event(self, step: int, what: str, **info):
    self.write(step, {'event': what, **info}, kind='event')

  def flush(self):
    if self._fh is not None:
      self._fh.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._fh is not None:
      self._fh.close()
      self._fh = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(path: str, kind: str = 'train') -> dict[int, dict]:
  """{step: record} for one kind, the last record per step winning; bad lines skipped."""
  if os.path.isdir(path):
    path = os.path.join(path, JSONL_NAME)
  out: dict[int, dict] = {}
  with open(path) as fh:
    for line in fh:
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      if isinstance(rec, dict) and rec.get('kind') == kind and 'step' in rec:
        out[int(rec['step'])] = rec
  return out
