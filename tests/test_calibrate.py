"""Calibration on tiny random models: W8A8 close to FP, frozen ranges, padding excluded,
planted activation outliers (per-tensor degrades; PEG and W8A{8,16} recover)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oqt_jax import models, quant

SEQ, BATCH, VOCAB = 16, 4, 100


def _cfg(model_type='bert', **kw):
  base = dict(model_type=model_type, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
              intermediate_size=64, max_position_embeddings=32,
              activation='gelu' if model_type == 'bert' else 'relu')
  base.update(kw)
  return models.ModelConfig(**base)


def _batches(n, seed=0, pad_from=None, rows=BATCH):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = rng.integers(3, VOCAB, (rows, SEQ)).astype(np.int32)
    mask = np.ones((rows, SEQ), np.int32)
    if pad_from is not None:
      mask[:, pad_from:] = 0
      mask[0, :] = 1                      # one full row so all positions stay exercised
      ids[mask == 0] = 0
    out.append({'input_ids': ids, 'attention_mask': mask,
                'token_type_ids': np.zeros_like(ids)})
  return out


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


_apply = jax.jit(lambda m, v, b: m.apply(v, b['input_ids'], attention_mask=b['attention_mask']),
                 static_argnums=0)


@pytest.fixture(scope='module')
def bert():
  model = models.build(_cfg())
  variables = models.init_variables(model, jax.random.PRNGKey(0), seq_len=SEQ)
  return model, variables


@pytest.fixture(scope='module')
def calibrated(bert):
  model, variables = bert
  cal = _batches(3, seed=1, pad_from=12)
  qmodel, qvars = quant.calibrate(model, variables, cal, quant.config(est_num_batches=3))
  return qmodel, qvars, cal


def test_w8a8_close_to_fp(bert, calibrated):
  model, variables = bert
  qmodel, qvars, _ = calibrated
  test = _batches(1, seed=7)[0]
  fp = _apply(model, variables, test).logits
  q = _apply(qmodel, qvars, test).logits
  err = _rel(q, fp)
  assert 1e-4 < err < 0.06, err           # quantized (not a no-op), yet close
  assert qmodel.quant.mode == 'frozen'
  assert type(_apply(qmodel, qvars, test)) is type(_apply(model, variables, test))


def test_quant_collection_holds_frozen_ranges(calibrated):
  qmodel, qvars, cal = calibrated
  ranges = quant.quant_ranges(qvars)
  for name in ('ewt', 'e', 'eln', 'q0', 's0', 'p0', 'c0', 'g0', 'u0', 'x0', 'f0', 'h0', 'y0', 'z0',
               'z1', 'Mt', 'Mln', 'M', 'Et', 'wq0', 'wf1', 'wM'):
    assert name in ranges, name
    lo, hi = ranges[name]
    assert np.all(hi > lo), name
  h0 = qvars['quant']['encoder_layer_0']['output']['h0']
  assert int(h0['n']) == 3                 # est_num_batches updates, then frozen
  # Frozen: applying again (even with the collection mutable) changes nothing.
  _, upd = jax.jit(lambda v, b: qmodel.apply(v, b['input_ids'], attention_mask=b['attention_mask'],
                                             mutable=['quant']))(qvars, _batches(1, seed=9)[0])
  same = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), upd['quant'],
                                qvars['quant'])
  assert all(jax.tree_util.tree_leaves(same))
  # Probabilities' range is within [0, 1]; the weight ranges are the weights' own.
  p_lo, p_hi = ranges['p0']
  assert 0.0 <= p_lo and p_hi <= 1.0 + 1e-6


def test_padding_never_enters_ranges(bert, calibrated):
  model, variables = bert
  _, qvars, cal = calibrated
  changed = []
  rng = np.random.default_rng(5)
  for b in cal:
    b = dict(b)
    ids = b['input_ids'].copy()
    pad = b['attention_mask'] == 0
    ids[pad] = rng.integers(3, VOCAB, int(pad.sum()))     # other tokens at padded positions
    b['input_ids'] = ids
    changed.append(b)
  _, qvars2 = quant.calibrate(model, variables, changed, quant.config(est_num_batches=3))
  r1, r2 = quant.quant_ranges(qvars), quant.quant_ranges(qvars2)
  for name in r1:
    np.testing.assert_allclose(r1[name][0], r2[name][0], rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(r1[name][1], r2[name][1], rtol=1e-6, atol=1e-7, err_msg=name)
  # Control: the same tokens counted as valid do move the ranges.
  valid = [dict(b, attention_mask=np.ones_like(b['attention_mask'])) for b in changed]
  _, qvars3 = quant.calibrate(model, variables, valid, quant.config(est_num_batches=3))
  r3 = quant.quant_ranges(qvars3)
  assert any(not np.allclose(r1[n][1], r3[n][1]) for n in ('e', 'y0', 'h1'))


def test_dynamic_mode(bert):
  model, variables = bert
  qmodel, qvars = quant.calibrate(model, variables, _batches(2), quant.config(dynamic=True))
  assert qmodel.quant.mode == 'dynamic'
  assert int(qvars['quant']['encoder_layer_0']['output']['h0']['n']) == 0   # never estimated
  test = _batches(1, seed=7)[0]
  err = _rel(_apply(qmodel, qvars, test).logits, _apply(model, variables, test).logits)
  assert 1e-4 < err < 0.06, err


def test_opt_w8a8_recipe_close_to_fp():
  model = models.build(_cfg('opt', word_embed_proj_dim=16))      # with project_in / out
  variables = models.init_variables(model, jax.random.PRNGKey(1), seq_len=SEQ)
  qcfg = quant.config(ranges_weights='mse', quant_setup='fp32_head', est_num_batches=2)
  cal = [{k: v for k, v in b.items() if k != 'token_type_ids'} for b in _batches(2, pad_from=10)]
  qmodel, qvars = quant.calibrate(model, variables, cal, qcfg)
  test = _batches(1, seed=3)[0]
  err = _rel(_apply(qmodel, qvars, test).logits, _apply(model, variables, test).logits)
  assert 1e-4 < err < 0.06, err
  assert 'M' not in quant.quant_ranges(qvars)          # fp32 head: logits not quantized
  for name in ('y1', 'a0', 'x1', 'fln', 'pin', 'pout', 'e', 'Et', 'Ep', 'wq0'):
    assert name in quant.quant_ranges(qvars), name


@pytest.mark.parametrize('model_type', ['bert', 'opt'])
def test_context_quantized_after_gate_bert_before_gate_opt(model_type):
  # A gate of ~1e-6: the context after the gate is ~1e-6 of the one before it. The originals
  # quantize BERT's context after the gate, OPT's (quantized_opt.py) before it.
  model = models.build(_cfg(model_type, num_layers=1, gate='conditional_per_token',
                            gate_init=1e-6))
  variables = models.init_variables(model, jax.random.PRNGKey(4), seq_len=SEQ)
  cal = _batches(1)
  if model_type == 'opt':
    cal = [{k: v for k, v in b.items() if k != 'token_type_ids'} for b in cal]
  _, qvars = quant.calibrate(model, variables, cal, quant.config(est_num_batches=1))
  _, hi = quant.quant_ranges(qvars)['c0']
  if model_type == 'opt':
    assert float(hi) > 1e-3, hi
  else:
    assert float(hi) < 1e-4, hi


def test_et_override_uses_mse_golden_for_the_word_table():
  # The originals switch the word embeddings to an MSE (golden-section) range whenever 'Et'
  # is in quant_dict.
  from oqt_jax.quant import estimators
  hooks = quant.QuantHooks.build(quant.config(quant_dict="{'Et': 4}"), _cfg())
  w = jax.random.normal(jax.random.PRNGKey(0), (VOCAB, 32)) * 0.02
  state, _ = hooks.weight_state('Et', w)
  ref = estimators.update('mse', estimators.init_state(()), w, n_bits=4, symmetric=True,
                          mse_search='golden')
  np.testing.assert_allclose(state['x_max'], ref['x_max'], rtol=1e-6)
  assert float(state['x_max']) < float(jnp.max(jnp.abs(w))) * 0.99   # clipped, not min/max


def test_tied_decoder_range_is_the_tables_or_its_own():
  # 'Et' and the tied decoder 'wM' quantize the same table: quantized alike, the decoder takes
  # the table's range (computed once); quantized otherwise (4 bits), its own.
  from oqt_jax.quant import estimators
  model = models.build(_cfg('opt', num_layers=1))
  variables = models.init_variables(model, jax.random.PRNGKey(2), seq_len=SEQ)
  table = variables['params']['embed_tokens']['embedding']
  cal = [{k: v for k, v in b.items() if k != 'token_type_ids'} for b in _batches(1)]
  for qd, wm_bits in (('', 8), ("{'wM': 4}", 4)):
    qcfg = quant.config(ranges_weights='mse', per_channel=True, est_num_batches=1,
                        quant_dict=qd)
    _, qvars = quant.calibrate(model, variables, cal, qcfg)
    ranges = quant.quant_ranges(qvars)
    for name, bits in (('Et', 8), ('wM', wm_bits)):
      ref = estimators.update('mse', estimators.init_state((VOCAB,)), table, reduce_axes=(1,),
                              n_bits=bits, symmetric=True)
      np.testing.assert_allclose(ranges[name][0], ref['x_min'], rtol=1e-5, err_msg=name)
      np.testing.assert_allclose(ranges[name][1], ref['x_max'], rtol=1e-5, err_msg=name)


def test_bert_cls_head_with_gate_and_clipped_softmax():
  cfg = _cfg(num_layers=1, head='cls', num_labels=3, gate='conditional_per_token',
             softmax='clipped(-.025:1)')
  model = models.build(cfg)
  variables = models.init_variables(model, jax.random.PRNGKey(2), seq_len=SEQ)
  qmodel, qvars = quant.calibrate(model, variables, _batches(2, pad_from=12),
                                  quant.config(quant_setup='MSE_logits', est_num_batches=2))
  test = _batches(1, seed=4)[0]
  out, ref = _apply(qmodel, qvars, test), _apply(model, variables, test)
  assert out.logits.shape == (BATCH, 3) and _rel(out.logits, ref.logits) < 0.25   # ~0.01 logits
  assert _rel(out.pooler_output, ref.pooler_output) < 0.05
  ranges = quant.quant_ranges(qvars)
  assert {'P', 'C', 'wP', 'wC', 'c0'} <= set(ranges)
  assert not any('gate' in str(path) for path in
                 jax.tree_util.tree_flatten_with_path(qvars['quant'])[0])   # gates not quantized


# ---- planted outliers --------------------------------------------------------------------------
SEP, OUTLIER_DIMS, NEURON = 2, [3, 11], 7


def _planted_bert():
  """A random one-layer BERT whose FFN writes ~250 into two hidden dims at [SEP] tokens only.

  [SEP]'s embedding has a distinctive dim 0; one FFN neuron fires only on it and its output
  weights put the outlier into OUTLIER_DIMS of the FFN output h, hence of the residual sum y.
  Weights are quantized per channel here, so the planted weights are not weight outliers.
  """
  model = models.build(_cfg(num_layers=1))
  variables = models.init_variables(model, jax.random.PRNGKey(0), seq_len=SEQ)
  p = jax.tree_util.tree_map(np.array, variables['params'])
  emb = p['word_embeddings']['embedding']
  emb[:] = np.random.default_rng(1).normal(size=emb.shape)
  emb[SEP, 0] = 8.0
  layer = p['encoder_layer_0']
  layer['intermediate']['kernel'][:, NEURON] = 0.0
  layer['intermediate']['kernel'][0, NEURON] = 4.0
  layer['intermediate']['bias'][NEURON] = -17.6
  layer['output']['kernel'][NEURON, OUTLIER_DIMS] = 200.0
  return model, {'params': p}


def _sep_batches(n, seed):
  out = _batches(n, seed=seed)
  for b in out:
    b['input_ids'][:, 7] = SEP
    b['input_ids'][:, -1] = SEP
  return out


def test_planted_outliers_degrade_per_tensor_and_peg_or_mixed_precision_recover():
  model, variables = _planted_bert()
  cal, test = _sep_batches(3, seed=1), _sep_batches(2, seed=2)
  test = {k: np.concatenate([b[k] for b in test]) for k in test[0]}
  fo = jax.jit(lambda v, b: model.apply(v, b['input_ids'], attention_mask=b['attention_mask'],
                                        mutable=['intermediates']))(variables, test)
  h0 = np.asarray(fo[1]['intermediates']['encoder_layer_0']['ffn_output'][0])
  normal = np.abs(np.delete(h0, OUTLIER_DIMS, -1)).max()
  assert np.abs(h0[..., OUTLIER_DIMS]).max() > 100 > 20 * normal
  fp = fo[0].logits

  def err(**kw):
    qm, qv = quant.calibrate(model, variables, cal,
                             quant.config(est_num_batches=3, per_channel=True, **kw))
    return _rel(_apply(qm, qv, test).logits, fp)

  per_tensor = err()
  peg = err(quant_dict="{'x': 'ngp16', 'h': 'ngp16', 'y': 'ngp16'}")
  mixed = err(quant_dict="{'x': 16, 'h': 16, 'y': 16}")
  print(f'planted outliers: per-tensor {per_tensor:.4f}  PEG {peg:.4f}  W8A{{8,16}} {mixed:.4f}')
  assert per_tensor > 0.15
  assert per_tensor > 2.0 * peg
  assert per_tensor > 5.0 * mixed


# ---- PEG: permutation from averaged per-batch ranges, group ranges from the group's values ----
import flax.linen as nn  # noqa: E402

from oqt_jax.quant.calibrate import assign_permutations  # noqa: E402
from oqt_jax.quant.hooks import QuantHooks  # noqa: E402

D_PEG, K_PEG = 16, 4


class _Point(nn.Module):
  """One activation point driven by the hooks (as a model layer would)."""
  hooks: QuantHooks
  point: str

  @nn.compact
  def __call__(self, x, mask):
    return self.hooks.act(self, self.point, x, mask)


def _peg_batches():
  rng = np.random.default_rng(7)
  scale = np.ones(D_PEG)
  scale[[2, 9, 13]] = [30.0, 8.0, 60.0]            # outlier dims of different widths
  out = []
  for i in range(4):
    x = (rng.normal(size=(2, 5, D_PEG)) * scale + rng.normal(size=D_PEG)).astype(np.float32)
    m = np.ones((2, 5), bool)
    if i == 1:
      m[:] = False                                  # no valid token: must not count
      x[:] = 1e4                                    # (and its values must not leak in)
    if i == 2:
      m[1, 2:] = False
      x[1, 2:] = -1e4
    out.append((x, m))
  return out


def _np_qdq(x, b, lo, hi):
  lo, hi = np.minimum(lo, 0).astype(np.float32), np.maximum(hi, 1e-8).astype(np.float32)
  q_max = np.float32(2 ** b - 1)
  s = np.maximum((hi - lo) / q_max, np.float32(1e-8)).astype(np.float32)
  z = np.clip(np.round(-lo / s), 0, q_max)
  return (s * (np.clip(np.round(x / s) + z, 0, q_max) - z)).astype(np.float32)


def _run_point(rules, point, batches):
  hooks = QuantHooks(rules, mode='init')
  mod = lambda mode: _Point(hooks.with_mode(mode), point)
  v = mod('init').init(jax.random.PRNGKey(0), *map(jnp.asarray, batches[0]))
  for mode in ('stats', 'calibrating'):
    if mode == 'stats' and not rules.needs_permutation:
      continue
    for x, m in batches:
      _, v = mod(mode).apply(v, jnp.asarray(x), jnp.asarray(m), mutable=['quant'])
    if mode == 'stats':
      v = {'quant': assign_permutations(v['quant'], rules)}
  return v['quant'][point], mod('frozen'), v


@pytest.mark.parametrize('estimator', ['running_minmax', 'percentile'])
@pytest.mark.parametrize('permute', [True, False])
def test_peg_groups_vs_numpy(estimator, permute):
  cfg = _cfg(hidden_size=D_PEG, num_layers=1)
  gran = f"ngp{K_PEG}" if permute else f"ng{K_PEG}"
  # (running_minmax with a percentile would be the EMA of per-batch percentiles: no percentile)
  pct = 99.0 if estimator == 'percentile' else -1.0
  rules = quant.rules(quant.config(quant_dict=f"{{'h0': '{gran}'}}", ranges_acts=estimator,
                                   percentile=pct), cfg)
  batches = _peg_batches()
  state, frozen, v = _run_point(rules, 'h0', batches)

  valid = [(x[m], x) for x, m in batches if m.any()]
  size = D_PEG // K_PEG
  if permute:   # mean over batches of each dim's per-batch range (max - min)
    mean_range = np.mean([v_.max(0) - v_.min(0) for v_, _ in valid], axis=0)
    perm = np.argsort(mean_range, kind='stable')
    gid = np.empty(D_PEG, int)
    gid[perm] = np.arange(D_PEG) // size
    np.testing.assert_array_equal(np.asarray(state['group_ids']), gid)
    # Not the permutation of the global (all-batch) min / max ranges here.
    allr = np.concatenate([v_ for v_, _ in valid])
    assert not np.array_equal(np.argsort(allr.max(0) - allr.min(0), kind='stable'), perm)
  else:
    gid = np.arange(D_PEG) // size
  # Group ranges: the estimator on each group's own values, EMA over the valid batches.
  lo = hi = None
  for vals, _ in valid:
    g_lo, g_hi = np.empty(K_PEG), np.empty(K_PEG)
    for k in range(K_PEG):
      gv = vals[:, gid == k].ravel()
      if estimator == 'running_minmax':
        g_lo[k], g_hi[k] = gv.min(), gv.max()
      else:
        g_lo[k], g_hi[k] = np.percentile(gv, [1.0, 99.0])
    lo, hi = (g_lo, g_hi) if lo is None else (0.1 * g_lo + 0.9 * lo, 0.1 * g_hi + 0.9 * hi)
  assert int(state['n']) == len(valid)
  np.testing.assert_allclose(np.asarray(state['x_min']), lo, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(state['x_max']), hi, rtol=1e-5, atol=1e-5)
  x, m = batches[0]
  got = np.asarray(frozen.apply(v, jnp.asarray(x), jnp.asarray(m)))
  want = _np_qdq(x, 8, np.asarray(state['x_min'])[gid], np.asarray(state['x_max'])[gid])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_permute_shared_h_with_h_kept_fp32():
  """x, h, y share h's permutation; h itself in fp32 is still observed for it."""
  model = models.build(_cfg(num_layers=1))
  variables = models.init_variables(model, jax.random.PRNGKey(0), seq_len=SEQ)
  cal = _batches(2, seed=4, pad_from=10)
  qcfg = quant.config(est_num_batches=2, permute_shared_h=True,
                      quant_dict="{'x': 'ngp4', 'h': 'ngp4', 'y': 'ngp4', 'h0': 'fp32'}")
  qmodel, qvars = quant.calibrate(model, variables, cal, qcfg)
  assert not qmodel.quant.rules.spec('h0').enabled
  q = qvars['quant']['encoder_layer_0']
  ids_x = np.asarray(q['attention_ln']['x0']['group_ids'])
  ids_y = np.asarray(q['y0']['group_ids'])
  np.testing.assert_array_equal(ids_x, ids_y)
  assert 'x_min' not in q['output']['h0']            # h0 stays floating point
  ranges = []
  fwd = jax.jit(lambda b: model.apply(variables, b['input_ids'],
                                      attention_mask=b['attention_mask'],
                                      mutable=['intermediates'])[1])
  for b in cal:
    h = np.asarray(fwd(b)['intermediates']['encoder_layer_0']['ffn_output'][0])
    vals = h[b['attention_mask'].astype(bool)]
    ranges.append(vals.max(0) - vals.min(0))
  perm = np.argsort(np.mean(ranges, 0), kind='stable')
  gid = np.empty(32, int)
  gid[perm] = np.arange(32) // 8
  np.testing.assert_array_equal(ids_x, gid)


# ---- bfloat16 compute: float32 accumulation into softmax / quantizers, 16-bit stays 16-bit ----
def test_bf16_scores_context_and_logits_accumulate_in_float32():
  b, t = 2, 6
  model = models.build(_cfg('opt', dtype='bfloat16'))
  variables = models.init_variables(model, jax.random.PRNGKey(0), seq_len=t)
  ids = jnp.ones((b, t), jnp.int32)
  text = str(jax.make_jaxpr(lambda v: model.apply(v, ids).logits)(variables))
  dots = [l.strip() for l in text.splitlines() if 'dot_general[' in l]
  out_of = lambda shape: [l for l in dots if f'[{shape}] = dot_general' in l]
  h, d = 4, 8
  for shape in (f'{b},{h},{t},{t}', f'{b},{h},{t},{d}', f'{b},{t},{VOCAB}'):   # QK^T, P.V, logits
    found = out_of(shape)
    assert found and all(l.split(':')[1].startswith('f32') for l in found), (shape, found)
  assert 'preferred_element_type=float32' in text
  # The FFN matmuls (no quantizer, no softmax) keep the compute dtype.
  assert any(l.split(':')[1].startswith('bf16') for l in out_of(f'{b},{t},64'))


def test_bf16_quantizers_stay_16_bit():
  from oqt_jax.models.layers import Dense
  cfg = _cfg(hidden_size=16, num_heads=2)
  rules = quant.rules(quant.config(quant_dict="{'f0': 16}"), cfg)
  hooks = QuantHooks(rules, mode='dynamic')          # ranges from the batch: no calibration
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 16)).astype(np.float32)
  kernel = rng.normal(size=(16, 8)).astype(np.float32)
  bias = rng.normal(size=8).astype(np.float32)
  params = {'params': {'kernel': jnp.asarray(kernel), 'bias': jnp.asarray(bias)}}
  outs = {}
  for point in ('f0', 'h0'):                           # 16-bit and 8-bit activations
    dense = Dense(8, point=point, dtype=jnp.bfloat16, quant=hooks)
    outs[point] = dense.apply(params, jnp.asarray(x))
    jaxpr = str(jax.make_jaxpr(lambda p: dense.apply(p, jnp.asarray(x)))(params))
    assert 'preferred_element_type=float32' in jaxpr
  assert outs['f0'].dtype == jnp.float32 and outs['h0'].dtype == jnp.bfloat16
  # numpy: weights fake-quantized (8-bit symmetric per tensor), bf16 operands, float32
  # accumulation, + bias, then the 16-bit asymmetric quantizer on the batch's own range.
  s_w = np.float32(np.abs(kernel).max() / 127.0)
  w_q = (np.clip(np.round(kernel / s_w), -128, 127) * s_w).astype(np.float32)
  bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
  y = (bf(x).astype(np.float64) @ bf(w_q) + bias).astype(np.float32)
  want = _np_qdq(y, 16, y.min(), y.max())
  step = (y.max() - min(y.min(), 0)) / 65535
  got = np.asarray(outs['f0'])
  np.testing.assert_allclose(got, want, rtol=0, atol=1.01 * step)
  assert np.abs(got - y).max() <= 0.51 * step + 1e-6        # on the 16-bit grid ...
  assert np.abs(bf(y) - y).max() > 20 * step                # ... which bf16 could not hold
