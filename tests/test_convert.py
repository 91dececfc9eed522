"""Checkpoint conversion by distillation (config.loss='distill', configs/convert/*.py,
experiments/convert.py) on a tiny BERT made with transformers."""
import json
import os
import signal
import sys

import jax
import numpy as np
import pytest

from oqt_jax import models
from oqt_jax.train import init_from as init_lib
from oqt_jax.train import losses
from oqt_jax.train import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import convert  # noqa: E402


@pytest.fixture(scope='module')
def tiny_bert(tmp_path_factory):
  return convert.make_tiny_bert(str(tmp_path_factory.mktemp('tiny_bert')))


def _inputs(n=4, t=24):
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 40, size=(n, t)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 2, 3
  mask = np.ones((n, t), np.int32)
  mask[1, -5:] = 0
  return {'input_ids': ids[None], 'attention_mask': mask[None],
          'token_type_ids': np.zeros((1, n, t), np.int32)}


def test_gated_fine_tuning_start_is_the_teacher(tiny_bert):
  cfg = convert.variant_config('gated', tiny_bert, 'smoke')
  cfg, params = init_lib.load_init(cfg, None)
  mcfg = models.from_config(cfg.model)
  assert mcfg.gate == 'conditional_per_token' and mcfg.fine_tuning
  teacher = losses.make_teacher(mcfg, params)
  hb = _inputs()
  want = teacher(hb)[0]
  student = models.build(mcfg)
  x = {k: v[0] for k, v in hb.items()}
  mask = x['attention_mask'].astype(bool)

  def run(p):
    return np.asarray(student.apply({'params': p}, **x, deterministic=True).last_hidden_state)
  # The teacher is the checkpoint itself (transformers' BertModel, computed independently).
  import torch
  import transformers
  ref = transformers.BertModel.from_pretrained(tiny_bert).eval()
  with torch.no_grad():
    hf_out = ref(**{k: torch.as_tensor(v) for k, v in x.items()}).last_hidden_state.numpy()
  assert np.abs(want - hf_out)[mask].max() < 1e-5
  # The conversion config's start (the gate's last Linear zero): pi / gate_init = 1, the
  # checkpoint's function, as initialised by the run itself.
  last = [v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
          if 'kernel2' in jax.tree_util.keystr(k)]
  assert len(last) == mcfg.num_layers and all(np.all(np.asarray(v) == 0) for v in last)
  assert np.abs(run(params) - want)[mask].max() < 1e-5
  # The original's init (every gate weight N(0, 0.01)): pi = 1 + O(1e-4), nearly kept.
  cfg.model.gate_last_init_std = -1.0
  cfg2, params2 = init_lib.load_init(cfg, None)
  last = [v for k, v in jax.tree_util.tree_flatten_with_path(params2)[0]
          if 'kernel2' in jax.tree_util.keystr(k)]
  assert 0.005 < float(np.std(np.concatenate([np.ravel(v) for v in last]))) < 0.02
  d = np.abs(np.asarray(models.build(models.from_config(cfg2.model)).apply(
      {'params': params2}, **x, deterministic=True).last_hidden_state) - want)[mask].max()
  assert 1e-7 < d < 1e-3, d


def _params(workdir):
  from safetensors.numpy import load_file
  return load_file(os.path.join(workdir, 'hf', 'model.safetensors'))


@pytest.mark.slow
def test_distill_loss_decreases_and_sigkill_resume_is_bit_identical(tiny_bert, tmp_path):
  env = testing.subprocess_env(compile_cache=str(tmp_path / 'cc'), fast_compile=True)
  over = {'init_from': tiny_bert, 'num_train_steps': 12, 'warmup_steps': 1,
          'learning_rate': 3e-3, 'per_device_batch_size': 4, 'global_batch_size': 4,
          'data.max_seq_length': 32, 'model.softmax_T': 32, 'checkpoint_every_steps': 4,
          'log_every_steps': 1}
  cfg = 'configs/convert/clipped.py'
  a = str(tmp_path / 'a')
  r = testing.run_train(cfg, a, over, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in open(os.path.join(a, 'metrics.jsonl'))]
  loss = [x['loss'] for x in rows if x.get('kind') == 'train']
  assert len(loss) == 12 and loss[0] > 0
  assert np.mean(loss[-3:]) < 0.7 * np.mean(loss[:3]), loss
  b = str(tmp_path / 'b')
  testing.seed_workdir(a, b)
  rc, err = testing.signal_train_when(cfg, b, over, lambda: bool(testing.committed_steps(b)),
                                      env=env, sig=signal.SIGKILL)
  assert rc == -signal.SIGKILL, err[-3000:]
  assert max(testing.committed_steps(b)) < 12
  r = testing.run_train(cfg, b, over, env=env)
  assert r.returncode == 0 and 'resumed from' in r.stderr, r.stderr[-3000:]
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    assert np.array_equal(pa[k], pb[k]), k


@pytest.mark.slow
def test_convert_smoke_end_to_end(tiny_bert, tmp_path):
  out = tmp_path / 'out'
  assert convert.main(['--smoke', '--hf_model', tiny_bert, '--out', str(out)]) == 0
  rows = json.loads((out / 'results.json').read_text())
  assert [r['variant'] for r in rows] == ['original', 'vanilla', 'gated', 'clipped']
  keys = ('fp_cosine', 'max_inf_norm', 'avg_kurtosis', 'max_kurtosis', 'w8a8_cosine_all',
          'w8a8_cosine_matmul', 'delimiter_mass', 'per_layer_inf_norm')
  for r in rows:
    assert all(k in r for k in keys), r.keys()
    assert all(np.isfinite(r[k]) for k in keys[:7])
  assert abs(rows[0]['fp_cosine'] - 1.0) < 1e-6
  assert rows[1]['fp_cosine'] > 0.9999          # vanilla: a fixed point of the distillation
  assert 'gate_mean_per_head' in rows[2]
  assert (out / 'results.md').read_text().count('| original |') == 2
  assert (out / 'per_layer.png').exists()
  assert convert.main(['--smoke', '--hf_model', tiny_bert, '--out', str(out),
                       '--variants', 'nope']) == 2
