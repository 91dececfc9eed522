"""End to end: `python train.py --config configs/tiny_*.py --workdir DIR` on the embedded corpus
(no network), shrunk further by command-line overrides so each run takes seconds; the same
command launched as two processes (a multi-host job on one machine: jax.distributed over
localhost) reproduces the one-process losses; and the one-line `error: ...` exits for bad
config values and unreadable data files."""
import json
import os
import socket
import subprocess

import pytest

from oqt_jax.train import metrics, testing

STEPS = 40


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return testing.subprocess_env(compile_cache=str(tmp_path_factory.mktemp('xla_cache')),
                                fast_compile=True)


def _losses(workdir):
  return [r['loss'] for _, r in sorted(metrics.read_metrics(str(workdir)).items())]


OPT = 'configs/tiny_opt_gated_attention.py'
BERT = 'configs/tiny_bert_gated_attention.py'
RUN = dict(testing.TINY_OVERRIDES, num_train_steps=STEPS, log_every_steps=1,
           checkpoint_every_steps=20, eval_every_steps=20)


@pytest.fixture(scope='module')
def opt_run(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp('opt') / 'run'
  return workdir, testing.run_train(OPT, str(workdir), RUN, env=env)


@pytest.mark.parametrize('config_file,extra', [
    (OPT, None),
    # BERT also exercises bf16 compute and gradient accumulation through the CLI.
    (BERT, {'compute_dtype': 'bfloat16', 'gradient_accumulation_steps': 2,
            'per_device_batch_size': 4}),
])
def test_tiny_config_trains_and_exports(tmp_path, env, opt_run, config_file, extra):
  if extra is None:
    workdir, r = opt_run
  else:
    workdir = tmp_path / 'run'
    r = testing.run_train(config_file, str(workdir), dict(RUN, **extra), env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  losses = _losses(workdir)
  assert len(losses) == STEPS
  first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
  assert last < first - 0.5, losses                       # clearly decreasing
  recs = list(metrics.read_metrics(str(workdir)).values())
  for key in ('loss', 'lr', 'grad_norm', 'tokens_per_s', 'step_time'):
    assert all(key in rec for rec in recs[1:]), key
  evals = metrics.read_metrics(str(workdir), kind='eval')
  assert sorted(evals) == [20, STEPS]
  assert evals[STEPS]['eval_perplexity'] < evals[20]['eval_perplexity']
  for key in ('max_inf_norm', 'avg_kurtosis', 'max_kurtosis'):   # the paper's outlier figures
    assert 0 < evals[STEPS][key] < 1e6, (key, evals[STEPS])
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['20', '40']
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  hf = workdir / 'hf'
  assert (hf / 'config.json').exists() and (hf / 'model.safetensors').exists()
  assert (hf / 'tokenizer.json').exists()
  cfg = json.loads((workdir / 'config.json').read_text())
  assert cfg['model']['vocab_size'] == 512
  if extra:
    assert cfg['model']['dtype'] == 'bfloat16'
  assert 'Traceback' not in r.stderr


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_reproduce_one_process(tmp_path, env, opt_run):
  """jax.distributed.initialize() from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID, one CPU device per process: the global batch (2 x 4 rows, each process
  reading its own rows) and hence the losses equal the one-process run's (8 rows)."""
  ref_dir, ref = opt_run
  assert ref.returncode == 0
  workdir = tmp_path / 'run'
  testing.seed_workdir(str(ref_dir), str(workdir))
  port = _free_port()
  overrides = dict(RUN, per_device_batch_size=4)
  procs = []
  for pid in range(2):
    penv = dict(env, JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
                JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(testing.train_command(OPT, str(workdir), overrides),
                                  cwd=testing.REPO_ROOT, env=penv, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  errs = []
  for p in procs:
    try:
      errs.append(p.communicate(timeout=500)[1])
    finally:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}; 2 process(es), 2 device(s)" in errs[0]
  got, want = _losses(workdir), _losses(ref_dir)
  assert len(got) == len(want) == STEPS
  for a, b in zip(got, want):
    assert abs(a - b) <= 1e-5 * abs(b), (got, want)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['20', '40']
  assert (workdir / 'hf' / 'model.safetensors').exists()


@pytest.mark.parametrize('overrides,needle', [
    ({'learning_rate': -1.0}, 'error: learning_rate=-1.0: must be >= 0.0'),
    ({'mesh.data': 3}, 'error: mesh='),
    ({'model.num_heads': 5}, 'error: model.num_heads=5'),
    ({'data.source': 'files', 'data.files': '/nonexistent/corpus.txt'},
     '/nonexistent/corpus.txt'),
])
def test_bad_input_fails_with_one_line(tmp_path, env, overrides, needle):
  r = testing.run_train('configs/tiny_opt_vanilla.py', str(tmp_path / 'run'),
                        dict(testing.TINY_OVERRIDES, **overrides), env=env, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  assert 'Traceback' not in r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]
