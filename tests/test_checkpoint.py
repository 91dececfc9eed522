"""Checkpoints: corrupt / half-written steps fall back to the previous one (unit, in-process),
and end to end with train.py: kill -9, SIGTERM and a corrupt latest checkpoint, each followed
by a rerun of the same command that reproduces the uninterrupted run's per-step losses."""
import glob
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oqt_jax.errors import CheckpointError
from oqt_jax.train import checkpoint, metrics, testing
from oqt_jax.train import sharding as shd

# Orbax leaves its reader coroutines unfinished when a damaged step fails to restore.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


# ----------------------------------------------------------------------------- unit
def _items(step):
  k = jax.random.PRNGKey(step)
  return {'step': jnp.asarray(step, jnp.int32),
          'params': {'dense': {'kernel': jax.random.normal(k, (64, 32)),
                               'bias': jnp.full((32,), float(step))}},
          'rng': jax.random.PRNGKey(7)}


def _target(items=None):
  mesh = shd.create_mesh(dict(data=-1, fsdp=1, tensor=1))
  rep = shd.replicated(mesh)
  items = items or _items(0)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), items)


def _write(workdir, steps=(10, 20, 30), keep=3):
  ck = checkpoint.Checkpointer(str(workdir), keep=keep, every=10)
  for s in steps:
    assert ck.save(s, _items(s))
  ck.close()


def _largest_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, '**'), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  f = _largest_file(step_dir)
  with open(f, 'r+b') as fh:
    fh.truncate(os.path.getsize(f) // 2)


def _garble_metadata(step_dir):
  with open(os.path.join(step_dir, 'default', '_METADATA'), 'w') as fh:
    fh.write('\x00not json{')


def _drop_manifest(step_dir):   # half-written: the array index never made it to disk
  os.remove(os.path.join(step_dir, 'default', 'manifest.ocdbt'))


@pytest.mark.parametrize('damage', [_truncate, _garble_metadata, _drop_manifest])
def test_corrupt_latest_is_reported_and_previous_used(tmp_path, capfd, damage):
  _write(tmp_path)
  latest = os.path.join(tmp_path, 'checkpoints', '30')
  damage(latest)
  ck = checkpoint.Checkpointer(str(tmp_path), keep=3, every=10)
  items, step = ck.restore_latest(_target())
  assert step == 20 and int(items['step']) == 20
  np.testing.assert_array_equal(items['params']['dense']['kernel'],
                                _items(20)['params']['dense']['kernel'])
  err = capfd.readouterr().err
  warn = [l for l in err.splitlines() if l.startswith('warning: checkpoint')]
  assert len(warn) == 1 and latest in warn[0] and 'corrupt or incomplete' in warn[0]
  # The damaged step is moved aside (kept for inspection) and can be written again.
  assert ck.all_steps() == [10, 20]
  assert glob.glob(os.path.join(tmp_path, 'checkpoints_corrupt', '30-*'))
  assert ck.save(30, _items(31))
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path), keep=3, every=10)
  items, step = ck.restore_latest(_target())
  assert step == 30 and float(items['params']['dense']['bias'][0]) == 31.0
  ck.close()


def test_leftover_temporary_dir_is_ignored(tmp_path):
  _write(tmp_path, steps=(10, 20))
  tmp = os.path.join(tmp_path, 'checkpoints', '30.orbax-checkpoint-tmp-1234')
  shutil.copytree(os.path.join(tmp_path, 'checkpoints', '20'), tmp)   # a save cut short
  ck = checkpoint.Checkpointer(str(tmp_path), keep=3, every=10)
  assert ck.all_steps() == [10, 20]
  assert ck.restore_latest(_target())[1] == 20
  ck.close()


def test_keep_last_k_and_interval(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path), keep=2, every=10)
  saved = [s for s in range(1, 41) if ck.save(s, _items(s))]
  ck.close()
  assert saved == [10, 20, 30, 40]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['30', '40']


def test_different_model_is_an_error_not_corruption(tmp_path):
  _write(tmp_path, steps=(10,))
  other = _items(0)
  other['params']['dense']['kernel'] = jnp.zeros((64, 16))
  ck = checkpoint.Checkpointer(str(tmp_path), keep=3, every=10)
  with pytest.raises(CheckpointError, match=r'params/dense/kernel has shape \(64, 32\)'):
    ck.restore_latest(_target(other))
  ck.close()
  assert os.listdir(tmp_path / 'checkpoints') == ['10']        # nothing moved
  assert not os.path.exists(tmp_path / 'checkpoints_corrupt')


def test_no_readable_checkpoint_is_an_error(tmp_path):
  _write(tmp_path, steps=(10, 20))
  for s in ('10', '20'):
    _truncate(os.path.join(tmp_path, 'checkpoints', s))
  ck = checkpoint.Checkpointer(str(tmp_path), keep=3, every=10)
  with pytest.raises(CheckpointError, match='no readable checkpoint'):
    ck.restore_latest(_target())
  ck.close()


# ----------------------------------------------------------------------------- end to end
STEPS = 100
EVERY = 20
CONFIG = 'configs/tiny_opt_gated_attention.py'
OVERRIDES = dict(testing.TINY_OVERRIDES, num_train_steps=STEPS, checkpoint_every_steps=EVERY,
                 keep_checkpoints=3, log_every_steps=1, eval_every_steps=0, num_eval_batches=1)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return testing.subprocess_env(compile_cache=str(tmp_path_factory.mktemp('xla_cache')),
                                fast_compile=True)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, env):
  """The uninterrupted run: (workdir, {step: loss}, final HF weights)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  r = testing.run_train(CONFIG, str(workdir), OVERRIDES, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return workdir, losses, (workdir / 'hf' / 'model.safetensors').read_bytes()


def _losses(workdir):
  return {s: r['loss'] for s, r in metrics.read_metrics(str(workdir)).items()}


def _events(workdir, what):
  return [r for r in metrics.read_metrics(str(workdir), kind='event').values()
          if r.get('event') == what] + []


def _resume_steps(workdir):
  out = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as fh:
    for line in fh:
      if '"event": "resume"' in line:
        out.append(int(line.split('"step": ')[1].split(',')[0]))
  return out


def _start_and_stop_after_checkpoint(workdir, env, sig, newer_than=0):
  """Start train.py, wait until a checkpoint newer than `newer_than` is committed, send `sig`."""
  return testing.signal_train_when(
      CONFIG, str(workdir), OVERRIDES,
      lambda: any(s > newer_than for s in testing.committed_steps(str(workdir))), env=env, sig=sig)


def _assert_same_losses(got, want, steps):
  for s in steps:
    assert abs(got[s] - want[s]) <= 1e-6 * max(1.0, abs(want[s])), (s, got[s], want[s])


def test_kill_9_then_rerun_resumes_and_matches(tmp_path, env, reference):
  ref_dir, ref_losses, ref_hf = reference
  workdir = tmp_path / 'run'
  testing.seed_workdir(str(ref_dir), str(workdir))

  rc, err = _start_and_stop_after_checkpoint(workdir, env, signal.SIGKILL)
  assert rc == -signal.SIGKILL, err[-2000:]
  killed_at = max(_losses(workdir))
  assert killed_at < STEPS                                   # it really died mid-run
  ckpt = max(testing.committed_steps(workdir))

  # Rerun the same command, then stop it with SIGTERM: it saves where it is and exits 143.
  rc, err = _start_and_stop_after_checkpoint(workdir, env, signal.SIGTERM, newer_than=ckpt)
  assert rc == 128 + signal.SIGTERM, err[-2000:]
  assert f'resumed from {workdir}/checkpoints/{ckpt} (step {ckpt})' in err
  assert 'Traceback' not in err
  stopped_at = max(s for s in _losses(workdir))
  assert testing.committed_steps(workdir)[-1] == stopped_at < STEPS  # saved on exit, mid-interval ok

  # Rerun again: resumes from the SIGTERM checkpoint and finishes.
  r = testing.run_train(CONFIG, str(workdir), OVERRIDES, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'(step {stopped_at})' in r.stderr
  assert _resume_steps(workdir) == [ckpt, stopped_at]
  _assert_same_losses(_losses(workdir), ref_losses, range(1, STEPS + 1))
  assert (workdir / 'hf' / 'model.safetensors').read_bytes() == ref_hf


def test_corrupt_latest_checkpoint_falls_back_end_to_end(tmp_path, env, reference):
  ref_dir, ref_losses, ref_hf = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  assert testing.committed_steps(workdir) == [STEPS - 2 * EVERY, STEPS - EVERY, STEPS]
  latest = os.path.join(workdir, 'checkpoints', str(STEPS))
  _truncate(latest)

  r = testing.run_train(CONFIG, str(workdir), OVERRIDES, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  warn = [l for l in r.stderr.splitlines() if l.startswith('warning: checkpoint')]
  assert len(warn) == 1 and latest in warn[0], r.stderr[-3000:]
  prev = STEPS - EVERY
  assert f'resumed from {workdir}/checkpoints/{prev} (step {prev})' in r.stderr
  _assert_same_losses(_losses(workdir), ref_losses, range(prev + 1, STEPS + 1))
  assert testing.committed_steps(workdir)[-1] == STEPS                # re-saved, readable again
  assert (workdir / 'hf' / 'model.safetensors').read_bytes() == ref_hf


def test_missing_items_names_whole_items_absent_from_the_checkpoint():
  import numpy as np
  from oqt_jax.train.checkpoint import missing_items
  saved = {'step': np.zeros(()), 'params': {'w': np.zeros((2, 3))}}
  want = dict(saved, quant={'x0': {'x_min': np.zeros(())}})
  assert missing_items(saved, want) == {'quant'}
  assert missing_items(saved, saved) == frozenset()
  # a changed model is not a missing item
  assert missing_items(saved, {'step': np.zeros(()), 'params': {'v': np.zeros(2)}}) == frozenset()
  assert missing_items(None, want) == frozenset()
