"""The training loop: `train_and_evaluate(config, workdir)`.

One call does everything `train.py` promises: tokenizer + data, model sized to the
tokenizer, mesh + sharded state, resume from the newest readable checkpoint, the jitted
step, periodic logging / evaluation / checkpoints, save on exit (also on SIGTERM / Ctrl-C),
final evaluation and the HF export. Rerunning the same command resumes: the batch of step N
is a pure function of (seed, N) and the dropout key of step N is fold_in(rng, N), so a
resumed run reproduces the uninterrupted one step for step.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from oqt_jax import data, models
from oqt_jax.models import hf
from oqt_jax.errors import CheckpointError, ConfigError, NonFiniteError
from oqt_jax.quant.methods import qat
from oqt_jax.train import sharding as shd
from oqt_jax.train.checkpoint import Checkpointer
from oqt_jax import config as config_lib   # the package's config module (validate, workdir)
from oqt_jax.train.config import check_batch_fit
from oqt_jax.train.evaluation import evaluate
from oqt_jax.train import init_from as init_lib
from oqt_jax.train import losses
from oqt_jax.train.metrics import MetricWriter
from oqt_jax.train.guards import (NonFiniteMonitor, check_batch, nonfinite_leaves,
                                  window_record)
from oqt_jax.train.optimizer import make_optimizer
from oqt_jax.train.state import (TrainState, abstract_params, abstract_state, create_train_state,
                                 state_shardings)
from oqt_jax.train.step import make_train_step

TRAIN_HEADS = ('mlm', 'clm', 'cls')
HF_DIR = 'hf'


def _info(msg: str):
  """Progress messages: printed by process 0 (not through logging, which Orbax floods)."""
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- config
def resolve_config(config: ml_collections.ConfigDict, tokenizer=None) -> ml_collections.ConfigDict:
  """A copy of `config` with the run-time model fields filled in:
  model.dtype from compute_dtype (bf16 compute keeps float32 params), and vocab_size /
  pad_token_id from the tokenizer (vocab_size is set to len(tokenizer) for a tokenizer
  trained here; a hub tokenizer larger than the model's vocabulary is an error)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    compute = config.get('compute_dtype', 'float32')
    if compute != 'float32':
      config.model.dtype = compute
    if tokenizer is not None:
      n = len(tokenizer)
      trained_here = not config.data.get('tokenizer', '')
      if n != config.model.vocab_size and trained_here:
        _info(f'model.vocab_size: {config.model.vocab_size} -> {n} (the tokenizer trained on '
              'the corpus)')
        config.model.vocab_size = n
      elif n > config.model.vocab_size:
        raise ConfigError(f'model.vocab_size={config.model.vocab_size}: smaller than the '
                          f'tokenizer {config.data.tokenizer!r} ({n} tokens)')
      pad = getattr(tokenizer, 'pad_token_id', None)
      if pad is not None and pad != config.model.pad_token_id:
        config.model.pad_token_id = int(pad)
  return config


def _get_tokenizer(data, config, workdir):
  """Process 0 trains/caches the tokenizer first; the others then read the cache."""
  if jax.process_count() == 1:
    return data.get_tokenizer(config, workdir)
  from jax.experimental import multihost_utils
  tok = data.get_tokenizer(config, workdir) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices('oqt_jax_tokenizer')
  return tok if tok is not None else data.get_tokenizer(config, workdir)


# ---------------------------------------------------------------------------- batches
def host_batch(ds, step: int, global_rows: int, accum: int) -> dict[str, np.ndarray]:
  """This process's rows of the batch of `step`, shaped (accum, rows/accum/processes, ...).

  The whole step's data is one ds.batch(step, ...) call for accum * global_rows rows in all
  (ds.batch takes the per-process row count), so the data of a step does not depend on how
  it is split into micro-batches or processes.
  """
  pi, pc = jax.process_index(), jax.process_count()
  local_rows = accum * global_rows // pc
  b = ds.batch(step, local_rows, process_index=pi, process_count=pc)
  out = {}
  for k, v in b.items():
    v = np.asarray(v)
    if v.ndim == 0:
      continue
    if v.shape[0] != local_rows:
      raise ConfigError(f'per_device_batch_size={global_rows}: the dataset returned '
                        f'{v.shape[0]} rows of {k!r}, expected {local_rows}')
    out[k] = v.reshape((accum, local_rows // accum) + v.shape[1:])
  return out


def device_batch(host: dict[str, np.ndarray], mesh, global_rows: int) -> dict[str, jax.Array]:
  return shd.global_batch(host, mesh, global_shape_dim0=global_rows, batch_dim=1)


# ---------------------------------------------------------------------------- signals
class StopFlag:
  """When to stop early, saving a checkpoint first.

  Single process: SIGTERM / SIGINT set the flag; the loop finishes the current step, saves
  and returns (a second SIGINT raises KeyboardInterrupt as usual).
  Several processes: every process must stop after the same step or the collectives hang,
  so the flag comes from JAX's preemption sync point (the distributed runtime catches the
  cluster's SIGTERM and the processes agree on a step); no Python handlers are installed.
  """

  def __init__(self):
    self.signum: Optional[int] = None
    self._old = {}
    self._multi = jax.process_count() > 1

  def __bool__(self):
    return self.signum is not None

  def check(self, step: int) -> bool:
    """True when the loop should stop after `step` (same answer on every process)."""
    if self._multi and self.signum is None:
      try:
        from jax.experimental import multihost_utils
        if multihost_utils.reached_preemption_sync_point(step):
          self.signum = signal.SIGTERM
          _info(f'preemption notice: saving a checkpoint at step {step} and stopping')
      except Exception:  # no preemption service in this runtime
        pass
    return self.signum is not None

  def _handler(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    _info(f'received {signal.Signals(signum).name}: saving a checkpoint and stopping after '
          'this step')

  def install(self):
    if self._multi or threading.current_thread() is not threading.main_thread():
      return self
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[s] = signal.signal(s, self._handler)
      except (ValueError, OSError):
        pass
    return self

  def restore(self):
    for s, h in self._old.items():
      try:
        signal.signal(s, h)
      except (ValueError, OSError):
        pass
    self._old = {}


def _alive(state: TrainState) -> bool:
  return not any(getattr(x, 'is_deleted', lambda: False)() for x in jax.tree.leaves(state))


# ---------------------------------------------------------------------------- HF export
def export_hf(model, state: TrainState, tokenizer, out_dir: str) -> Optional[str]:
  """Write the final model (and tokenizer) as an HF checkpoint dir (None on processes other
  than the first)."""
  bad = nonfinite_leaves(state.params)
  if bad:
    raise NonFiniteError(f'HF export to {out_dir}: non-finite values in {bad[0]} '
                         f'({len(bad)} array(s)); not written')
  params = shd.to_host(state.params)
  if jax.process_index() != 0:
    return None
  hf.save(model, {'params': params}, out_dir)
  if tokenizer is not None and hasattr(tokenizer, 'save_pretrained'):
    tokenizer.save_pretrained(out_dir)
  return out_dir


# ---------------------------------------------------------------------------- main loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Optional[Sequence[Any]] = None,
                       progress: bool = True) -> dict[str, Any]:
  """Train (or resume) the run of `config` in `workdir`; returns a summary dict:
  step, interrupted (signal number or None), last train / eval metrics, hf_dir."""
  config = config_lib.resolve(config)  # every section, before any slow work: one line naming
                                       # the bad field; nothing below validates again
  workdir = os.fspath(workdir)
  if '://' in workdir:
    raise ConfigError(f'workdir={workdir!r}: must be a filesystem path every host sees (mount a '
                      'bucket with gcsfuse, or use NFS / Filestore)')
  workdir = config_lib.prepare_workdir(workdir)

  mesh = shd.create_mesh(config.mesh, devices)
  global_rows = check_batch_fit(config, mesh.size, shd.batch_shards(mesh), jax.process_count())
  accum = int(config.gradient_accumulation_steps)

  init_params = None
  if config.get('init_from', ''):         # fine-tuning: model fields + tokenizer from init_from
    config, init_params = init_lib.load_init(config, workdir)
  tokenizer = _get_tokenizer(data, config, workdir)
  config = resolve_config(config, tokenizer)
  mcfg = models.from_config(config.model)
  head = mcfg.resolved_head
  if head not in TRAIN_HEADS and config.get('loss', 'lm') != 'distill':   # distill: any head
    raise ConfigError(f'model.head={config.model.head!r}: nothing to train (expected one of '
                      f'{TRAIN_HEADS} or auto)')
  model = models.build(mcfg)
  # config.loss='distill': the init_from checkpoint, frozen, is the teacher (also on resume).
  teacher = (losses.make_teacher(mcfg, init_params)
             if config.get('loss', 'lm') == 'distill' else None)
  train_ds = data.build_dataset(config, tokenizer, 'train', workdir=workdir)
  eval_ds = None
  if config.eval_every_steps or config.num_eval_batches:
    eval_ds = data.build_dataset(config, tokenizer, 'validation', workdir=workdir)

  if config.get('num_train_epochs', -1) > 0 or config.get('warmup_ratio', -1.0) >= 0:
    config = init_lib.resolve_schedule(config, train_ds.num_examples, global_rows * accum)
  muon = config.get('optimizer', 'adamw') == 'muon'   # Muon needs to know the param shapes
  tx, schedule = make_optimizer(config, nn.meta.unbox(abstract_params(model)) if muon else None)
  shardings = state_shardings(model, tx, mesh)
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints, every=config.checkpoint_every_steps)
  target = abstract_state(model, tx, mesh, shardings)
  qat_on = qat.enabled(config)
  if qat_on:   # the range state is part of the train state (replicated)
    qat.check(config, mcfg)
    shardings, target = _qat_target(model, config, shardings, target, train_ds, global_rows,
                                    mesh, schedule)
  items, restored_step = _restore(ckpt, target, qat_on)
  if items is not None:
    state = target.with_items(items)
    start = int(jax.device_get(state.step))
    _info(f'resumed from {ckpt.step_dir(restored_step)} (step {start})')
  else:
    state = create_train_state(model, tx, mesh, config.seed, shardings.replace(
        quant=None, quant_opt_state=None, range_tx=None, learn_ranges='none'))
    start = 0
    if init_params is not None:
      state = init_lib.with_params(state, init_params, shardings)
  init_params = None
  schedule_note = schedule_change(config, workdir, start) if items is not None else None
  if schedule_note:
    _info(schedule_note)
  if qat_on and (items is None or 'quant' not in items):   # QAT starts here: calibrate
    state = _start_qat(model, config, state, shardings, train_ds, global_rows, mesh)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as fh:
      fh.write(config.to_json_best_effort(indent=2, sort_keys=True))

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  _info(f'{mcfg.model_type} ({head}) {n_params / 1e6:.2f}M params; mesh {dict(mesh.shape)}; '
        f'{jax.process_count()} process(es), {mesh.size} device(s) ({jax.devices()[0].platform}); '
        f'batch {global_rows} x {accum} accumulation; steps {start} -> {config.num_train_steps}')

  writer = MetricWriter(workdir)
  if start:
    writer.event(start, 'resume', checkpoint=ckpt.step_dir(restored_step))
  if schedule_note:
    writer.event(start, 'schedule_change', message=schedule_note)
  monitor = NonFiniteMonitor(config.get('nonfinite', 'stop'), config.get('max_skipped_steps', 10))
  batch_keys = None
  train_step = None
  total = int(config.num_train_steps)
  stop = StopFlag().install()
  summary: dict[str, Any] = {'step': start, 'interrupted': None, 'train': {}, 'eval': {},
                             'hf_dir': None}
  bar = None
  if progress and jax.process_index() == 0:
    try:
      from tqdm import tqdm
      bar = tqdm(total=total, initial=start, desc='train', dynamic_ncols=True, file=sys.stderr)
    except ImportError:
      bar = None

  step = start
  pending: list[dict] = []
  pending_steps: list[int] = []
  halted = False          # a non-finite step or a failed save: nothing more is saved
  window_tokens, window_steps = 0, 0
  t_window = time.perf_counter()
  first_step_done = False
  finished = False
  stopping = stop.check(step)
  try:
    while step < total and not stopping:
      hb = host_batch(train_ds, step, global_rows, accum)
      check_batch(hb, mcfg.vocab_size, mcfg.max_position_embeddings,
                  where=f'train batch of step {step + 1}')
      if teacher is not None:
        hb['teacher_hidden'] = teacher(hb)
      if train_step is None:
        batch_keys = tuple(sorted(hb))
        train_step = make_train_step(qat.quantized_model(model, config) if qat_on else model,
                                     head, schedule, shardings, mesh, batch_keys,
                                     distill_mlm_weight=float(config.get('distill_mlm_weight',
                                                                         0.0)))
      step_tokens = int(hb['attention_mask'].sum()) * jax.process_count()
      state, m = train_step(state, device_batch(hb, mesh, global_rows))
      pending.append(m)
      step += 1
      pending_steps.append(step)
      if not first_step_done:      # compile time is reported once, not in the throughput
        jax.block_until_ready(m)
        first_step_done = True
        writer.event(step, 'first_step', seconds=round(time.perf_counter() - t_window, 3))
        t_window = time.perf_counter()
      else:
        window_tokens += step_tokens
        window_steps += 1
      stopping = stop.check(step)
      log_now = step % config.log_every_steps == 0 or step == total or stopping
      eval_now = bool(eval_ds is not None and config.eval_every_steps
                      and step % config.eval_every_steps == 0 and step != total)
      if log_now or eval_now or ckpt.due(step):
        # A point where the host waits for the device anyway: read the finite flags.
        pending = jax.device_get(pending)
        try:
          monitor.check(pending_steps, pending)
        except NonFiniteError as e:
          halted = True
          writer.write(step, window_record(pending))
          writer.event(step, 'nonfinite', message=str(e))
          last = ckpt.latest_step()
          raise NonFiniteError(f'{e}; ' + (f'the last checkpoint is {ckpt.step_dir(last)}'
                                           if last is not None else 'no checkpoint was written')
                               ) from None
      if log_now:
        got = pending
        dt = time.perf_counter() - t_window
        rec = window_record(got)
        if window_steps:
          rec['step_time'] = dt / window_steps
          rec['tokens_per_s'] = window_tokens / max(dt, 1e-9)
        writer.write(step, rec)
        summary['train'] = rec
        if bar is not None:
          bar.set_postfix(loss=f'{rec["loss"]:.4f}', lr=f'{rec["lr"]:.2e}')
        pending, pending_steps, window_tokens, window_steps = [], [], 0, 0
        t_window = time.perf_counter()
      if bar is not None:
        bar.update(1)
      if eval_now:
        ev = evaluate(state, config, eval_ds, mesh=mesh)
        writer.write(step, ev, kind='eval')
        summary['eval'] = ev
        t_window, window_tokens, window_steps = time.perf_counter(), 0, 0
      try:
        ckpt.save(step, state.checkpoint_items())
      except (CheckpointError, NonFiniteError):
        halted = True
        raise
    finished = step >= total
  finally:
    stop.restore()
    if bar is not None:
      bar.close()
    try:
      if halted:   # the last checkpoint written is the last good one; the error is reported
        try:
          ckpt.close()
        except Exception:
          pass
      elif _alive(state):
        if pending:   # the flags of the steps since the last sync decide whether to save
          monitor.check(pending_steps, jax.device_get(pending))
        ckpt.save(step, state.checkpoint_items(), force=True)
      else:
        _info(f'warning: state of step {step} was lost mid-step; the last periodic checkpoint '
              'is kept')
      if not halted:
        ckpt.close()
    except Exception as e:  # never mask the original exception
      _info(f'warning: final checkpoint not saved ({type(e).__name__}: {e})')
    writer.flush()

  summary['step'] = step
  summary['interrupted'] = stop.signum
  try:
    if finished and eval_ds is not None:
      ev = evaluate(state, config, eval_ds, mesh=mesh)
      writer.write(step, ev, kind='eval')
      summary['eval'] = ev
      _info(f'step {step}: eval loss {ev["eval_loss"]:.4f}, perplexity '
            f'{ev["eval_perplexity"]:.2f}' + (f', {ev["glue_task"]} {ev["glue_metric"]:.4f}'
                                              if 'glue_metric' in ev else ''))
    if finished and config.get('export_hf', True):
      summary['hf_dir'] = export_hf(model, state, tokenizer, os.path.join(workdir, HF_DIR))
      if qat_on and summary['hf_dir']:   # the learned quantizers, beside the weights
        qat.export(shd.to_host(state.quant), summary['hf_dir'], config)
      if summary['hf_dir']:
        _info(f'HF checkpoint written to {summary["hf_dir"]}')
  finally:
    writer.close()
  if stop:
    _info(f'stopped at step {step}; checkpoint saved; rerun the same command to resume')
  return summary


SCHEDULE_FIELDS = ('num_train_steps', 'learning_rate', 'warmup_steps', 'lr_schedule')


def schedule_change(config, workdir: str, start: int) -> Optional[str]:
  """A one-line note when a resumed run's learning-rate schedule differs from the one the
  workdir was trained with (its config.json), e.g. after raising num_train_steps; else None."""
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as fh:
      old = json.load(fh)
  except (OSError, ValueError):
    return None
  changed = [f'{f} {old[f]!r} -> {config.get(f)!r}' for f in SCHEDULE_FIELDS
             if f in old and old[f] != config.get(f)]
  if not changed:
    return None
  return (f'note: {", ".join(changed)} (from {path}): the learning-rate schedule changes from '
          f'the resumed step {start} on')


# ---------------------------------------------------------------------------- QAT
def _qat_target(model, config, shardings, target, train_ds, global_rows, mesh, schedule):
  """Shardings and restore target with the QAT range state (replicated)."""
  hb = host_batch(train_ds, 0, global_rows, 1)
  batch = {k: v[0] for k, v in hb.items()}
  learn = qat.learn_ranges(config)
  range_tx = qat.range_optimizer(schedule)
  quant = qat.abstract_quant(model, config, target.params, batch)
  opt = jax.eval_shape(range_tx.init, qat.split(quant, learn))
  rep = shd.replicated(mesh)
  shardings = shardings.replace(quant=jax.tree.map(lambda _: rep, quant),
                                quant_opt_state=jax.tree.map(lambda _: rep, opt),
                                range_tx=range_tx, learn_ranges=learn)
  spec = lambda t: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), t)
  target = target.replace(quant=spec(quant), quant_opt_state=spec(opt), range_tx=range_tx,
                          learn_ranges=learn)
  return shardings, target


def _restore(ckpt, target, qat_on):
  """restore_latest; with QAT, a floating-point checkpoint (no range state) restores its
  parameters and QAT starts from them."""
  try:
    return ckpt.restore_latest(target.checkpoint_items())
  except CheckpointError as e:
    missing = getattr(e, 'missing_items', frozenset())
    if not (qat_on and 'quant' in missing and missing <= {'quant', 'quant_opt_state'}):
      raise
  fp = target.replace(quant=None, quant_opt_state=None)
  items, step = ckpt.restore_latest(fp.checkpoint_items())
  _info(f'QAT starts from the floating-point checkpoint {ckpt.step_dir(step)}')
  return items, step


def _start_qat(model, config, state, shardings, train_ds, global_rows, mesh):
  """Calibrate the ranges on est_num_batches train batches and add them to the state."""
  n = int(config.quant.est_num_batches)
  # The whole global batch on every process: all processes calibrate identical ranges.
  batches = [{k: np.asarray(v) for k, v in train_ds.batch(i, global_rows).items()
              if np.ndim(v)} for i in range(n)]
  quant = qat.calibrate_ranges(model, shd.to_host(state.params), batches, config)
  _info(f'QAT: ranges calibrated on {n} train batches (learn_ranges='
        f'{qat.learn_ranges(config)!r})')
  return qat.with_quant(state, quant, shardings.range_tx, shardings.learn_ranges,
                        shd.replicated(mesh))
