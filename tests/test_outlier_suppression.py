"""Outlier Suppression: Gamma Migration keeps the FP function (BERT, pre-/post-LN OPT; random
and lightly trained) and shrinks LN output ranges with large gammas; Token-Wise Clipping's
clipping rule against a numpy restatement, the coarse ratio search and the LSQ+ fine stage on
planted outlier tokens; eval.py --config.quant.method=outlier_suppression end to end."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oqt_jax import models, quant
from oqt_jax.quant.methods import migration
from oqt_jax.quant.methods import outlier_suppression as os_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, BATCH, VOCAB = 12, 4, 50


def _cfg(model_type='bert', **kw):
  base = dict(model_type=model_type, vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2,
              intermediate_size=32, max_position_embeddings=32,
              activation='gelu' if model_type == 'bert' else 'relu')
  base.update(kw)
  return models.ModelConfig(**base)


def _batches(n, seed=0, pad=True):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = rng.integers(3, VOCAB, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.int32)
    if pad:
      mask[1, 8:] = 0
      mask[3, 5:] = 0
      ids[mask == 0] = 0
    out.append({'input_ids': ids, 'attention_mask': mask, 'token_type_ids': np.zeros_like(ids)})
  return out


def _logits(model, variables, b):
  return np.asarray(model.apply(variables, jnp.asarray(b['input_ids']),
                                attention_mask=jnp.asarray(b['attention_mask'])).logits)


def _trained(model, variables, steps=15):
  """A few Adam steps on a masked next-token / token cross-entropy: gammas and betas move."""
  b = _batches(1, seed=7, pad=False)[0]
  ids = jnp.asarray(b['input_ids'])
  target = jnp.roll(ids, -1, axis=1)
  opt = optax.adam(5e-2)

  def loss(p):
    logits = model.apply({'params': p}, ids).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  p, s = variables['params'], opt.init(variables['params'])
  for _ in range(steps):
    p, s = step(p, s)
  return {'params': p}


@pytest.mark.parametrize('kind', ['bert', 'opt_pre', 'opt_post'])
def test_gamma_migration_keeps_fp_logits_random_and_trained(kind):
  mt = 'bert' if kind == 'bert' else 'opt'
  model = models.build(_cfg(mt, do_layer_norm_before=kind != 'opt_post'))
  variables = models.init_variables(model, jax.random.PRNGKey(1), seq_len=SEQ)
  runs = [variables]
  if kind != 'opt_post':
    trained = _trained(model, variables)
    gammas = [np.asarray(migration._get(trained['params'], p)['scale'])
              for p, _ in migration.ln_consumers(model.cfg)]
    assert max(np.abs(g - 1).max() for g in gammas) > 0.1      # training moved the gammas
    runs.append(trained)
  b = _batches(1, seed=3)[0]
  for v in runs:
    mig, mv = quant.gamma_migration(model, v)
    assert mig.cfg.gamma_migrated and not model.cfg.gamma_migrated
    ref, got = _logits(model, v, b), _logits(mig, mv, b)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    # The migrated LNs hold gamma only as the residual factor; their own scale is 1.
    for (p, consumers), g in zip(migration.ln_consumers(model.cfg),
                                 [np.asarray(migration._get(v['params'], p)['scale'])
                                  for p, _ in migration.ln_consumers(model.cfg)]):
      ln = migration._get(mv['params'], p)
      np.testing.assert_allclose(ln['migrated_scale'], g, rtol=1e-6)
      np.testing.assert_allclose(ln['scale'], np.ones_like(g), rtol=1e-6)
      for c in consumers:
        np.testing.assert_allclose(migration._get(mv['params'], c)['kernel'],
                                   np.asarray(migration._get(v['params'], c)['kernel']) * g[:, None],
                                   rtol=1e-6)


def _planted_gammas(model, variables, big=25.0):
  """Large gammas (and betas) on two dims of every LayerNorm."""
  p = jax.tree_util.tree_map(np.array, variables['params'])
  rng = np.random.default_rng(5)
  for path in jax.tree_util.tree_flatten_with_path(p)[0]:
    keys = tuple(k.key for k in path[0])
    if keys[-1] == 'scale':
      ln = migration._get(p, keys[:-1])
      ln['scale'][:] = rng.uniform(0.5, 1.5, ln['scale'].shape)
      ln['scale'][[1, 6]] = [big, -big]
      ln['bias'][:] = rng.normal(0, 0.3, ln['bias'].shape)
  return {'params': p}


def test_gamma_migration_shrinks_ln_output_ranges_with_planted_gammas():
  model = models.build(_cfg('bert'))
  variables = _planted_gammas(model, models.init_variables(model, jax.random.PRNGKey(2),
                                                           seq_len=SEQ))
  cal = _batches(2, seed=4)
  mig, mv = quant.gamma_migration(model, variables)
  np.testing.assert_allclose(_logits(mig, mv, cal[0]), _logits(model, variables, cal[0]),
                             atol=1e-5, rtol=1e-5)
  qcfg = quant.config(est_num_batches=2, ranges_acts='allminmax')
  r0 = quant.quant_ranges(quant.calibrate(model, variables, cal, qcfg)[1])
  r1 = quant.quant_ranges(quant.calibrate(mig, mv, cal, qcfg)[1])
  for ln_path, _ in migration.ln_consumers(model.cfg):
    point = migration.ln_point(model.cfg, ln_path)
    width0 = float(r0[point][1] - r0[point][0])
    width1 = float(r1[point][1] - r1[point][0])
    assert width1 < width0 / 5, (point, width0, width1)


def test_gamma_zero_is_guarded():
  model = models.build(_cfg('bert'))
  variables = models.init_variables(model, jax.random.PRNGKey(3), seq_len=SEQ)
  p = jax.tree_util.tree_map(np.array, variables['params'])
  ln = p['encoder_layer_0']['attention_ln']
  ln['scale'][[0, 5]] = 0.0
  ln['bias'][[0, 5]] = 0.7
  mig, mv = quant.gamma_migration(model, {'params': p})
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(mv))
  new = mv['params']['encoder_layer_0']['attention_ln']
  np.testing.assert_array_equal(new['migrated_scale'][[0, 5]], [1.0, 1.0])   # not migrated
  np.testing.assert_array_equal(new['scale'][[0, 5]], [0.0, 0.0])
  b = _batches(1, seed=3)[0]
  np.testing.assert_allclose(_logits(mig, mv, b), _logits(model, {'params': p}, b),
                             atol=1e-5, rtol=1e-5)


# ---- Token-Wise Clipping: the rule -------------------------------------------------------------
def _np_twc(u, l, valid, ratios):
  """REFERENCE §3 restated: U = quantile(|u|, p), L = -quantile(|l|, p) over valid tokens;
  upper = max{u_t <= U}, lower = min{l_t >= L}."""
  u, l = u[valid], l[valid]
  lo, hi = [], []
  for p in ratios:
    big_u = np.quantile(np.abs(u).astype(np.float64), p)
    big_l = -np.quantile(np.abs(l).astype(np.float64), p)
    hi.append(u[u <= big_u].max())
    lo.append(l[l >= big_l].min())
  return np.array(lo), np.array(hi)


def test_twc_rule_matches_numpy():
  rng = np.random.default_rng(0)
  ratios = os_.candidate_ratios(6)
  assert len(ratios) == 31 and ratios[0] == 1.0 and abs(ratios[-1] - 0.7) < 1e-6
  assert len(os_.candidate_ratios(8)) == 11 and len(os_.candidate_ratios(4)) == 91
  for trial in range(3):
    u = rng.standard_normal(200).astype(np.float32) * 2 + 1
    u[rng.integers(0, 200, 5)] = 40.0 * (trial + 1)          # outlier tokens
    l = -np.abs(rng.standard_normal(200).astype(np.float32)) * 3
    valid = rng.random(200) > 0.2
    u[~valid] = 1e4                                           # padding never counts
    l[~valid] = -1e4
    lo, hi = os_.twc_ratio_ranges(u, l, valid, ratios)
    ref_lo, ref_hi = _np_twc(u, l, valid, ratios)
    np.testing.assert_allclose(np.asarray(lo), ref_lo, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(hi), ref_hi, rtol=1e-6)
    assert float(hi[0]) == u[valid].max() and float(hi[-1]) < 40
  lo, hi = os_.twc_ratio_ranges(u, l, np.zeros_like(valid), ratios)
  assert np.isnan(np.asarray(lo)).all() and np.isnan(np.asarray(hi)).all()


def test_token_min_max_per_token_and_for_attention_maps():
  rng = np.random.default_rng(1)
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  x = rng.standard_normal((2, 4, 6)).astype(np.float32)
  u, l, valid = os_.token_min_max(x, mask)
  np.testing.assert_allclose(np.asarray(u)[mask], x.max(-1)[mask])
  np.testing.assert_allclose(np.asarray(l)[mask], x.min(-1)[mask])
  np.testing.assert_array_equal(np.asarray(valid), mask)
  s = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
  s[:, :, :, 3] = 99.0                                       # a padded key of both rows
  u, l, valid = os_.token_min_max(s, mask)
  for b in range(2):
    for t in range(4):
      if mask[b, t]:
        keys = s[b, :, t][:, mask[b]]
        assert float(u[b, t]) == keys.max() and float(l[b, t]) == keys.min()
  np.testing.assert_array_equal(np.asarray(valid), mask)


# ---- Token-Wise Clipping on planted outlier tokens ---------------------------------------------
SEP, OUT_DIMS, NEURON = 2, [3, 11], 5


def _planted_outlier_tokens():
  """A one-layer BERT whose FFN writes > 100 into two hidden dims at [SEP] tokens only."""
  model = models.build(_cfg('bert', num_layers=1, hidden_size=32, intermediate_size=64,
                           init_std=0.08))
  variables = models.init_variables(model, jax.random.PRNGKey(0), seq_len=SEQ)
  p = jax.tree_util.tree_map(np.array, variables['params'])
  emb = p['word_embeddings']['embedding']
  emb[:] = np.random.default_rng(1).normal(size=emb.shape)
  emb[SEP, 0] = 8.0
  layer = p['encoder_layer_0']
  layer['intermediate']['kernel'][:, NEURON] = 0.0
  layer['intermediate']['kernel'][0, NEURON] = 6.0
  layer['intermediate']['bias'][NEURON] = -15.0
  layer['output']['kernel'][NEURON, OUT_DIMS] = 30.0
  return model, {'params': p}


def _sep_batches(n, seed):
  out = _batches(n, seed=seed)
  for b in out:
    b['input_ids'][:, 2] = SEP
  return out


def _output_mse(qmodel, qvars, model, variables, batches):
  tot = cnt = 0.0
  for b in batches:
    q, f = _logits(qmodel, qvars, b), _logits(model, variables, b)
    m = b['attention_mask'].astype(bool)
    tot += float(np.square(q - f)[m].sum())
    cnt += float(m.sum() * q.shape[-1])
  return tot / cnt


@pytest.fixture(scope='module')
def twc_run():
  model, variables = _planted_outlier_tokens()
  cal = _sep_batches(2, seed=1)
  qcfg = quant.config(est_num_batches=2, n_bits=8, n_bits_act=6, per_channel=True,
                      twc_lr=1e-5, twc_epochs=3)
  qm, qv, info = quant.token_wise_clipping(model, variables, cal, qcfg, return_info=True)
  return model, variables, cal, qcfg, qm, qv, info


def test_twc_coarse_picks_a_ratio_below_one_and_beats_minmax(twc_run):
  model, variables, cal, qcfg, qm, qv, info = twc_run
  h = jax.jit(lambda v, b: model.apply(v, b['input_ids'], attention_mask=b['attention_mask'],
                                       mutable=['intermediates']))(variables, cal[0])
  ffn = np.asarray(h[1]['intermediates']['encoder_layer_0']['ffn_output'][0])
  assert np.abs(ffn[:, 2, OUT_DIMS]).min() > 50 > 10 * np.abs(np.delete(ffn, 2, 1)).max()
  print(f"TWC ratio {info['ratio']:.2f}: output MSE min-max {info['minmax_mse']:.4f} -> "
        f"coarse {min(info['coarse_mse']):.4f} -> fine {info['fine_mse']:.4f}")
  assert info['ratio'] < 1.0
  coarse = min(info['coarse_mse'])
  assert coarse < 0.5 * info['minmax_mse']
  # ... and below the plain calibration (running min-max) with the same bits.
  pm, pv = quant.calibrate(model, variables, cal, qcfg)
  assert coarse < 0.5 * _output_mse(pm, pv, model, variables, cal)
  assert {'h0', 'y0', 'x0'} <= set(info['points'])


def test_twc_fine_stage_lowers_the_error_and_returns_plain_frozen_ranges(twc_run):
  model, variables, cal, qcfg, qm, qv, info = twc_run
  assert info['fine_kept'] and info['fine_mse'] < min(info['coarse_mse'])
  assert qm.quant.mode == 'frozen' and type(qm.quant) is quant.QuantHooks
  # The returned ranges reproduce the fine-stage error with the ordinary frozen hooks.
  got = _output_mse(qm, qv, model, variables, cal)
  assert abs(got - info['fine_mse']) < 1e-3 * info['fine_mse'] + 1e-9


def test_twc_rejects_dynamic_and_bad_fields():
  from oqt_jax.errors import ConfigError
  model = models.build(_cfg('opt', num_layers=1))
  variables = models.init_variables(model, jax.random.PRNGKey(0), seq_len=SEQ)
  with pytest.raises(ConfigError, match=r'^quant\.dynamic'):
    quant.token_wise_clipping(model, variables, _batches(1), quant.config(dynamic=True))
  for kw, field in [(dict(twc_lr=0.0), 'quant.twc_lr'), (dict(twc_epochs=0), 'quant.twc_epochs'),
                    (dict(method='nope'), 'quant.method'),
                    (dict(smoothquant_alpha=1.5), 'quant.smoothquant_alpha')]:
    with pytest.raises(ConfigError, match='^' + field.replace('.', r'\.')):
      quant.config(**kw)


def test_method_preset_fills_only_fields_not_given():
  from oqt_jax.quant import methods
  q = quant.config(n_bits=8)
  p = methods.with_preset(q, 'outlier_suppression', explicit=['n_bits'], batch_size=32)
  assert (p.n_bits, p.n_bits_act, p.per_channel, p.est_num_batches) == (8, 6, True, 8)
  assert methods.with_preset(q, '', batch_size=32).to_dict() == q.to_dict()
  assert set(methods.METHODS) >= {'', 'outlier_suppression', 'smoothquant'}


@pytest.mark.slow
def test_eval_py_outlier_suppression_end_to_end(tmp_path):
  from oqt_jax.models import hf
  cfg = models.ModelConfig(model_type='bert', vocab_size=2048, hidden_size=32, num_layers=2,
                           num_heads=4, intermediate_size=64, max_position_embeddings=64)
  model = models.build(cfg)
  hf.save(model, models.init_variables(model, jax.random.PRNGKey(0)), str(tmp_path / 'hf'))
  env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1',
             TRANSFORMERS_OFFLINE='1')
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'eval.py'),
       '--config', os.path.join(ROOT, 'configs/tiny_bert_vanilla.py'), '--workdir',
       str(tmp_path), '--num_batches=2', '--batch_size=4', '--config.data.max_seq_length=32',
       '--config.quant.method=outlier_suppression', '--config.quant.est_num_batches=2',
       '--config.quant.twc_epochs=1', '--noprogress', '--noplots'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / 'eval_metrics.json') as fh:
    q = json.load(fh)['quantized']
  c = q['quant_config']
  assert c['method'] == 'outlier_suppression' and c['est_num_batches'] == 2   # flag kept
  assert (c['n_bits'], c['n_bits_act'], c['per_channel']) == (6, 6, True)  # preset
  assert q['perplexity'] > 1
