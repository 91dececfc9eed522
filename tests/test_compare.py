"""The method comparison: row selection, the table, and `eval.py --compare` end to end on a
tiny trained OPT (no network)."""
import json
import os
import subprocess
import sys

import pytest

from oqt_jax.errors import ConfigError
from oqt_jax.quant.methods import compare
from oqt_jax.train import testing

# Rows whose methods live in this module's own code paths (calibrate, PEG, LLM.int8(),
# weight-only); the others come from the Outlier Suppression / SmoothQuant / AdaRound modules.
OWN_ROWS = ('fp', 'w8a8_minmax', 'w8a8_percentile', 'w8a8_mse', 'peg', 'w8a16', 'llm_int8',
            'weight_only')


def test_parse_methods():
  assert compare.parse_methods(None) == compare.METHOD_NAMES
  assert compare.parse_methods('all') == compare.METHOD_NAMES
  assert compare.parse_methods(' llm_int8, fp ,llm_int8') == ('llm_int8', 'fp')
  with pytest.raises(ConfigError, match=r"^--methods='fp,int4': unknown method int4 \(known: fp,"):
    compare.parse_methods('fp,int4')
  assert set(OWN_ROWS) < set(compare.METHOD_NAMES) and len(compare.METHOD_NAMES) == 11
  assert compare.peg_groups(768) == 6 and compare.peg_groups(32) == 4
  # Min-max and MSE rows drop a recipe's percentile (it would make running_minmax an EMA of
  # percentiles) unless the weights use the percentile estimator.
  q = compare.ml_collections.ConfigDict({'percentile': 99.999, 'ranges_weights': 'mse'})
  assert compare._no_percentile(q) == {'percentile': -1.0}
  q.ranges_weights = 'percentile'
  assert compare._no_percentile(q) == {}
  assert compare.merged_quant_dict(compare.derived(
      compare.ml_collections.ConfigDict({'quant_dict': "{'Et': 4}"})), {'h': 16}) == \
      "{'Et': 4, 'h': 16}"


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('cmp') / 'opt'
  env = testing.subprocess_env(fast_compile=True)
  r = testing.run_train('configs/tiny_opt_vanilla.py', str(workdir),
                        dict(testing.TINY_OVERRIDES, num_train_steps=30,
                             checkpoint_every_steps=30, eval_every_steps=30), env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir, env


def _cheap_method_flags():
  """Few AdaRound iterations and no Token-Wise Clipping fine stage, where those fields exist."""
  from configs import base
  q = base.quant_defaults()
  cheap = {'adaround_iters': 10, 'adaround_samples': 8, 'twc_fine': False}
  return [f'--config.quant.{k}={v}' for k, v in cheap.items() if k in q]


def _eval(workdir, env, *args):
  cmd = [sys.executable, os.path.join(testing.REPO_ROOT, 'eval.py'),
         '--config', os.path.join(testing.REPO_ROOT, 'configs/tiny_opt_vanilla.py'),
         '--workdir', str(workdir), '--noprogress', '--num_batches=1', '--batch_size=8',
         '--config.quant.est_num_batches=1', '--config.quant.num_candidates=10',
         *testing.flags_for(testing.TINY_OVERRIDES), *_cheap_method_flags(), *args]
  return subprocess.run(cmd, cwd=testing.REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=900)


@pytest.mark.slow
def test_eval_py_compare_writes_every_row(trained):
  workdir, env = trained
  r = _eval(workdir, env, '--compare')
  assert r.returncode == 0, r.stderr[-3000:]
  with open(workdir / 'comparison.json') as fh:
    rep = json.load(fh)
  rows = {row['name']: row for row in rep['rows']}
  assert list(rows) == list(compare.METHOD_NAMES)             # every row, in order
  assert rep['metric'] == 'perplexity' and rep['model_type'] == 'opt'
  for name in OWN_ROWS:
    row = rows[name]
    assert not row.get('error'), (name, row.get('error'))
    assert row['metric'] > 1 and row['max_inf_norm'] > 0 and row['model_bytes'] > 0
    assert abs(row['delta'] - (row['metric'] - rows['fp']['metric'])) < 1e-9
    assert abs(row['metric'] / rows['fp']['metric'] - 1) < 0.2, name   # 8-bit: close to FP
  for name, row in rows.items():     # every method, the 4-bit AdaRound row included, has a figure
    assert not row.get('error') and row['metric'] > 1, (name, row.get('error'))
  fp_bytes = rows['fp']['model_bytes']
  assert rows['weight_only']['model_bytes'] < 0.35 * fp_bytes
  assert rows['w8a8_minmax']['model_bytes'] < fp_bytes
  assert rows['peg']['peg_groups'] == 4                      # hidden 32: K = 4
  fr = rows['llm_int8']['outlier_fraction_per_layer']
  assert len(fr) == 12 and all(0 <= v <= 1 for v in fr.values())
  md = (workdir / 'comparison.md').read_text()
  for name in compare.METHOD_NAMES:
    assert f'({name})' in md and f'({name})' in r.stdout
  with open(workdir / 'comparison.png', 'rb') as fh:
    assert fh.read(8) == b'\x89PNG\r\n\x1a\n'
  # Unknown rows: one line, exit 2.
  r = _eval(workdir, env, '--compare', '--methods=fp,nope')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("error: --methods='fp,nope': unknown "
                                                      'method nope (known: fp, w8a8_minmax')


@pytest.mark.slow
def test_evaluate_run_weight_only_reports_sizes(trained, capfd):
  from configs import tiny_opt_vanilla
  from oqt_jax.evaluate.run import evaluate_run
  workdir, _ = trained
  config = tiny_opt_vanilla.get_config()
  for k, v in testing.TINY_OVERRIDES.items():
    sect, field = k.split('.') if '.' in k else (None, k)
    (config[sect] if sect else config)[field] = v
  config.quant.weight_only = True
  res = evaluate_run(config, str(workdir), quantize=True, num_batches=1, batch_size=8,
                     out_dir=str(workdir / 'wo'), plots_on=False, progress=False)
  q = res['quantized']
  assert q['model_bytes_int8'] < 0.35 * q['model_bytes_fp']
  assert abs(q['perplexity'] / res['perplexity'] - 1) < 0.05
  err = capfd.readouterr().err
  assert 'weight-only int8: model size' in err
  assert 'calibrating' not in err              # weight-only int8 needs no calibration


def test_classification_metric_falls_back_to_accuracy():
  import jax
  import ml_collections
  import numpy as np
  from oqt_jax import models
  from oqt_jax.evaluate import comparison
  cfg = models.ModelConfig(model_type='bert', head='cls', vocab_size=64, hidden_size=16,
                           num_layers=1, num_heads=2, intermediate_size=32,
                           max_position_embeddings=16, num_labels=3)
  model = models.build(cfg)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batches = [{'input_ids': rng.integers(2, 64, (4, 8)), 'attention_mask': np.ones((4, 8), int),
              'labels': np.array([0, 1, 2, -100])} for _ in range(2)]
  config = ml_collections.ConfigDict({'data': {'source': 'files'}})
  name, acc = comparison.metric_of(config, model, model, variables, batches, {})
  hits = [int(np.argmax(model.apply(variables, jax.numpy.asarray(b['input_ids'])).logits[i]) == l)
          for b in batches for i, l in enumerate(b['labels']) if l != -100]
  assert name == 'accuracy' and acc == sum(hits) / 6
