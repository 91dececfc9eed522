"""Faults: non-finite losses (config.nonfinite stop / skip), checkpoint guards (NaN never
written, a failed save keeps the previous checkpoint), window_steps and the schedule-change
note after a resume, eval.py on a non-finite model, command-line mistakes as one line
`error: ...`, and (slow, end to end) train.py SIGKILLed at random steps plus a full disk,
reproducing the uninterrupted run step for step."""
import errno
import os
import random
import re
import signal
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from oqt_jax import data, models
from oqt_jax.config import load_config_file, parse_cli_flags, prepare_workdir
from oqt_jax.errors import CheckpointError, ConfigError, NonFiniteError
from oqt_jax.train import checkpoint, guards, loop, metrics, testing

pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')

ROOT = testing.REPO_ROOT
CONFIG = os.path.join(ROOT, 'configs', 'tiny_opt_vanilla.py')
BASE = dict(testing.TINY_OVERRIDES, eval_every_steps=0, num_eval_batches=0, export_hf=False,
            log_every_steps=1, checkpoint_every_steps=1, keep_checkpoints=20)


def _config(**kw):
  return load_config_file(CONFIG, dict(BASE, **kw))


@pytest.fixture(scope='module')
def seed_dir(tmp_path_factory):
  """A workdir holding the trained tokenizer and tokenized corpus, copied into each run."""
  d = str(tmp_path_factory.mktemp('seed'))
  c = _config()
  tok = data.get_tokenizer(c, d)
  data.build_dataset(loop.resolve_config(c, tok), tok, 'train', workdir=d)
  return d


@pytest.fixture
def workdir(tmp_path, seed_dir):
  w = str(tmp_path / 'run')
  testing.seed_workdir(seed_dir, w)
  return w


def _ckpt_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _restore(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as m:
    return jax.device_get(m.restore(step, args=ocp.args.StandardRestore()))


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _all_finite(tree):
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


# ----------------------------------------------------------------------------- non-finite
# train.py run through a driver that can poison steps (their loss and gradient are NaN) and
# fill the disk (Orbax's save fails with ENOSPC from a step on); compiled with the cheap XLA
# flags and a shared compile cache, so every run after the first compiles nothing.
DRIVER = """
import errno, os, runpy, sys
poisoned = {int(s) for s in os.environ.get('POISON_STEPS', '').split(',') if s}
if poisoned:
  import jax.numpy as jnp
  from oqt_jax.train import loop, losses
  real_loss, real_batch = losses.loss_for_head, loop.host_batch
  def loss(head, logits, batch):
    s, c = real_loss(head, logits, batch)
    return s * jnp.where(jnp.any(batch['attention_mask'] == 7), jnp.nan, 1.0), c
  def host_batch(ds, step, rows, accum):
    b = real_batch(ds, step, rows, accum)
    if step + 1 in poisoned:
      b = dict(b, attention_mask=b['attention_mask'].copy())
      b['attention_mask'][0, 0, -1] = 7
    return b
  losses.loss_for_head, loop.host_batch = loss, host_batch
if os.environ.get('FULL_DISK_AT'):
  import orbax.checkpoint as ocp
  real_save = ocp.CheckpointManager.save
  def save(self, step, *a, **k):
    if step >= int(os.environ['FULL_DISK_AT']):
      os.makedirs(os.path.join(str(self.directory), f'{step}.orbax-checkpoint-tmp-1'),
                  exist_ok=True)
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(self, step, *a, **k)
  ocp.CheckpointManager.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return testing.subprocess_env(compile_cache=str(tmp_path_factory.mktemp('xla_cache')),
                                fast_compile=True)


def _train(workdir, env, overrides, poison=(), full_disk_at=None, script='train.py'):
  cmd = testing.train_command(CONFIG, str(workdir), dict(BASE, **overrides))
  cmd[1] = os.path.join(ROOT, script)
  extra = {'POISON_STEPS': ','.join(map(str, poison))}
  if full_disk_at is not None:
    extra['FULL_DISK_AT'] = str(full_disk_at)
  return subprocess.run([sys.executable, '-c', DRIVER, *cmd[1:]], cwd=ROOT,
                        env=dict(env, **extra), capture_output=True, text=True, timeout=600)


def _one_error(r):
  """The single `error: ...` line of a run that exited 2 (no warning, no traceback)."""
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith(('error', 'warning', 'Traceback'))]
  assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr[-3000:]
  return lines[0][len('error: '):]


@pytest.mark.slow
def test_nan_stops_keeps_finite_checkpoints_and_eval_reports_it(workdir, env):
  """A learning rate of 1e30 (a real overflow, no injection): train.py stops with one line
  and exit 2, only finite checkpoints exist, nothing is exported; eval.py on that workdir
  says the model is non-finite instead of printing NaN / -inf statistics."""
  r = _train(workdir, env, dict(num_train_steps=10, learning_rate=1e30, checkpoint_every_steps=1,
                                log_every_steps=3, export_hf=True))
  msg = _one_error(r)
  assert re.match(r"^step \d+: non-finite loss \((nan|inf), grad_norm \S+\); stopped "
                  r"\(config.nonfinite='stop'\)", msg), msg
  bad = int(msg.split()[1].rstrip(':'))
  assert bad > 2 and msg.endswith(os.path.join(workdir, 'checkpoints', str(bad - 1)))
  assert _ckpt_steps(workdir) == list(range(1, bad))
  assert all(_all_finite(_restore(workdir, s)) for s in _ckpt_steps(workdir))
  assert not os.path.exists(os.path.join(workdir, 'hf'))
  ev = [r for r in metrics.read_metrics(workdir, kind='event').values()
        if r.get('event') == 'nonfinite']
  assert len(ev) == 1 and ev[0]['message'].startswith(f'step {bad}:')

  e = _train(workdir, env, dict(num_eval_batches=1), script='eval.py')
  assert 'non-finite evaluation loss' in _one_error(e)
  assert not os.path.exists(os.path.join(workdir, 'eval_metrics.json'))


@pytest.mark.slow
def test_nonfinite_skip_then_resume_with_more_steps(workdir, env):
  poison = {3, 4, 8, 9, 10}
  r = _train(workdir, env, dict(num_train_steps=14, nonfinite='skip', max_skipped_steps=3),
             poison=poison)
  assert re.match(r'^step 10: non-finite loss .*3 non-finite steps in a row '
                  r'\(config.max_skipped_steps=3\)', _one_error(r))
  recs = metrics.read_metrics(workdir)
  assert sorted(recs) == list(range(1, 11))
  for s, rec in recs.items():
    skipped = s in poison
    assert rec['skipped_steps'] == int(skipped) and rec['window_steps'] == 1, rec
    assert (rec['loss'] == 'nan') == skipped, rec
  # A skipped step leaves parameters and optimizer state exactly as they were; the step
  # counter moves on (the next step reads the next batch).
  assert _ckpt_steps(workdir) == list(range(1, 10))
  ck = {s: _restore(workdir, s) for s in (2, 3, 4, 5, 7, 9)}
  for a, b in ((2, 3), (3, 4), (7, 9)):
    assert _same(ck[a]['params'], ck[b]['params'])
    assert _same(ck[a]['opt_state'], ck[b]['opt_state'])
    assert int(ck[b]['step']) == b
  assert not _same(ck[4]['params'], ck[5]['params'])
  assert all(_all_finite(c) for c in ck.values())

  # Resume (no more poison) with more steps and another logging interval: the schedule
  # change is reported once, and the first record after the resume covers only steps 10-12.
  r = _train(workdir, env, dict(num_train_steps=16, nonfinite='skip', max_skipped_steps=3,
                                log_every_steps=4))
  assert r.returncode == 0, r.stderr[-3000:]
  notes = [l for l in r.stderr.splitlines() if l.startswith('note: ')]
  assert len(notes) == 1 and 'num_train_steps 14 -> 16' in notes[0], r.stderr[-3000:]
  assert 'resumed step 9' in notes[0]
  recs = metrics.read_metrics(workdir)
  assert sorted(recs) == list(range(1, 11)) + [12, 16]
  assert (recs[12]['window_steps'], recs[16]['window_steps']) == (3, 4)
  assert recs[12]['skipped_steps'] == recs[16]['skipped_steps'] == 0


def test_monitor_and_window_record():
  m = guards.NonFiniteMonitor('skip', 2)
  ok = {'loss': 2.0, 'grad_norm': 1.0, 'lr': 1e-3, 'tokens': 10.0, 'finite': 1.0}
  bad = {'loss': 2.5, 'grad_norm': float('inf'), 'lr': 2e-3, 'tokens': 10.0, 'finite': 0.0}
  m.check([1, 2, 3], [ok, bad, ok])
  m.check([3, 4], [ok, bad])                  # step 3 already seen: not counted twice
  with pytest.raises(NonFiniteError, match='^step 5: non-finite gradient'):
    m.check([5], [bad])
  assert m.skipped == 3
  with pytest.raises(NonFiniteError, match=r"^step 2: non-finite gradient \(loss 2.5, "
                                           r"grad_norm inf\); stopped \(config.nonfinite='stop'"):
    guards.NonFiniteMonitor('stop', 5).check([1, 2], [ok, bad])
  ok2 = dict(ok, loss=4.0, grad_norm=3.0)
  rec = guards.window_record([ok, bad, ok2])
  assert rec == {'loss': 3.0, 'grad_norm': 2.0, 'lr': 1e-3, 'tokens': 30.0, 'window_steps': 3,
                 'skipped_steps': 1}


def test_checkpoint_never_written_with_nan(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path), keep=3, every=1)
  items = {'step': jnp.int32(1), 'params': {'w': jnp.ones((4, 4)), 'b': jnp.zeros(4)}}
  assert ck.save(1, items)
  bad = {'step': jnp.int32(2), 'params': {'w': jnp.ones((4, 4)).at[1, 2].set(jnp.nan),
                                          'b': jnp.zeros(4)}}
  with pytest.raises(NonFiniteError, match=r'^step 2: non-finite values in params/w'):
    ck.save(2, bad)
  ck.close()
  assert _ckpt_steps(str(tmp_path)) == [1]


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
  ck = checkpoint.Checkpointer(str(tmp_path), keep=3, every=1)
  items = lambda s: {'step': jnp.int32(s), 'params': {'w': jnp.full((8,), float(s))}}
  assert ck.save(1, items(1))
  ck.wait()

  def full_disk(self, step, *a, **k):
    os.makedirs(os.path.join(str(tmp_path), 'checkpoints', f'{step}.orbax-checkpoint-tmp-9'))
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_disk)
  with pytest.raises(CheckpointError) as e:
    ck.save(2, items(2))
  msg = str(e.value)
  assert msg.startswith(os.path.join(str(tmp_path), 'checkpoints', '2') + ': checkpoint save '
                        'failed (OSError: [Errno 28] No space left on device)')
  assert msg.endswith(f'the previous checkpoint {tmp_path}/checkpoints/1 is kept')
  ck.close()
  monkeypatch.undo()
  ck = checkpoint.Checkpointer(str(tmp_path), keep=3, every=1)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), items(0))
  got, step = ck.restore_latest(target)
  assert step == 1 and float(got['params']['w'][0]) == 1.0
  ck.close()


# ----------------------------------------------------------------------------- eval.py
def _tiny_opt(nan=False):
  cfg = models.ModelConfig(model_type='opt', vocab_size=512, hidden_size=32, num_layers=2,
                           num_heads=2, intermediate_size=64, max_position_embeddings=64,
                           activation='relu', pad_token_id=1)
  model = models.build(cfg)
  v = models.init_variables(model, jax.random.PRNGKey(0))
  if nan:
    v = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), v)
  return model, v


def test_eval_reports_nonfinite_parameters(tmp_path, seed_dir):
  from oqt_jax.evaluate.run import evaluate_run
  from oqt_jax.models import hf
  model, v = _tiny_opt(nan=True)
  hf_dir = str(tmp_path / 'hf')
  hf.save(model, v, hf_dir)
  workdir = str(tmp_path / 'eval')
  testing.seed_workdir(seed_dir, workdir)
  with pytest.raises(CheckpointError, match=r'hf: non-finite parameters \(decoder_layer_0/'):
    evaluate_run(_config(num_eval_batches=1), workdir, hf_model=hf_dir, progress=False,
                 plots_on=False)
  assert not os.path.exists(os.path.join(workdir, 'eval_metrics.json'))


# ----------------------------------------------------------------------------- command line
def _flag_values():
  """Fresh flags like train.py's (ml_collections registers overrides on the FlagValues)."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=False)
  flags.DEFINE_string('workdir', None, 'workdir', flag_values=fv)
  return fv


def _parse(argv, fv):
  with mock.patch.object(sys, 'argv', argv):   # ml_collections reads overrides from sys.argv
    return parse_cli_flags(argv, fv)


def _cli_error(capsys, *args):
  with pytest.raises(SystemExit) as e:
    _parse(['prog', *args], _flag_values())
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  return err[0]


def test_cli_mistakes_are_one_line(capsys, tmp_path):
  nope = str(tmp_path / 'nope.py')
  assert _cli_error(capsys, f'--config={nope}') == f'error: --config={nope}: no such file'
  noget = tmp_path / 'noget.py'
  noget.write_text('x = 1\n')
  assert _cli_error(capsys, '--config', str(noget)) == \
      f'error: --config={noget}: does not define get_config()'
  boom = tmp_path / 'boom.py'
  boom.write_text('def get_config():\n  raise ValueError("boom")\n')
  assert 'ValueError: boom' in _cli_error(capsys, f'--config={boom}')
  assert _cli_error(capsys, f'--config={CONFIG}', '--config.num_train_step=2') == \
      ("error: --config.num_train_step=2: no config field 'num_train_step'; did you mean "
       "'num_train_steps'?")
  assert "did you mean 'model.num_layers'?" in _cli_error(
      capsys, f'--config={CONFIG}', '--config.model.num_layer=3')
  assert 'num_train_steps=abc' in _cli_error(capsys, f'--config={CONFIG}',
                                             '--config.num_train_steps=abc')
  assert "Unknown command line flag 'bogus'" in _cli_error(capsys, '--bogus=1')
  fv = _flag_values()
  rest = _parse(['prog', f'--config={CONFIG}', '--config.num_train_steps=7'], fv)
  assert rest == ['prog'] and fv.config.num_train_steps == 7


def test_workdir_that_cannot_be_written(tmp_path):
  f = tmp_path / 'file'
  f.write_text('x')
  with pytest.raises(ConfigError, match=f'^workdir={f}: exists and is not a directory$'):
    prepare_workdir(str(f))
  with pytest.raises(ConfigError, match=r'^workdir=/proc/x: cannot be created'):
    prepare_workdir('/proc/x')
  with pytest.raises(ConfigError, match=f'^workdir={f}/sub: cannot be created'):
    prepare_workdir(str(f / 'sub'))
  assert prepare_workdir(str(tmp_path / 'a' / 'b')) == str(tmp_path / 'a' / 'b')


# ----------------------------------------------------------------------------- end to end
KILL_STEPS = 36
KILL_RUN = dict(num_train_steps=KILL_STEPS, checkpoint_every_steps=2, keep_checkpoints=3,
                export_hf=True)


def _losses(workdir):
  if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    return {}
  return {s: r['loss'] for s, r in metrics.read_metrics(str(workdir)).items()}


def _kill_at(workdir, env, target):
  """Start train.py; SIGKILL it as soon as step `target` is logged."""
  return testing.signal_train_when(CONFIG, str(workdir), dict(BASE, **KILL_RUN),
                                   lambda: max(_losses(workdir), default=0) >= target, env=env)


@pytest.mark.slow
def test_sigkill_at_random_steps_and_full_disk_reproduce_the_run(tmp_path, seed_dir, env):
  ref = tmp_path / 'reference'
  testing.seed_workdir(seed_dir, str(ref))
  r = _train(ref, env, KILL_RUN)
  assert r.returncode == 0, r.stderr[-3000:]
  want = _losses(ref)
  assert sorted(want) == list(range(1, KILL_STEPS + 1))

  workdir = tmp_path / 'run'
  testing.seed_workdir(seed_dir, str(workdir))
  rng = random.Random(7)
  kills = []
  while len(kills) < 2:
    target = max(_losses(workdir), default=0) + rng.randint(2, 5)
    rc, err = _kill_at(workdir, env, target)
    assert rc == -signal.SIGKILL, err[-3000:]
    kills.append(target)
  assert max(kills) < KILL_STEPS - 4

  # A full disk while saving: one line, exit 2; the previous checkpoint is kept and used.
  full_at = max(_losses(workdir)) + 3
  full_at += full_at % 2                                       # a checkpoint step
  msg = _one_error(_train(workdir, env, KILL_RUN, full_disk_at=full_at))
  assert msg.startswith(f'{workdir}/checkpoints/{full_at}: checkpoint save failed (OSError: '
                        '[Errno 28] No space left on device)'), msg
  assert msg.endswith(f'the previous checkpoint {workdir}/checkpoints/{full_at - 2} is kept')

  r = _train(workdir, env, KILL_RUN)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'resumed from {workdir}/checkpoints/{full_at - 2} ' in r.stderr
  got = _losses(workdir)
  assert sorted(got) == list(range(1, KILL_STEPS + 1))
  for s in want:
    assert abs(got[s] - want[s]) <= 1e-6 * max(1.0, abs(want[s])), (s, got[s], want[s])
  assert (workdir / 'hf' / 'model.safetensors').read_bytes() == \
      (ref / 'hf' / 'model.safetensors').read_bytes()
  resumes = [r for r in metrics.read_metrics(str(workdir), kind='event').values()
             if r.get('event') == 'resume']
  assert len(resumes) >= len(kills)
