"""Outlier Suppression: Gamma Migration keeps the FP function (BERT, pre-/post-LN OPT; random
and lightly trained), guards gamma = 0 and shrinks LN output ranges with large gammas;
Token-Wise Clipping against a torch restatement of the original's search (grid step and
iteration count, per-token clipping rule, the ratio picked on planted outlier tokens with
weights in floating point), the LSQ+ fine stage (every activation quantizer trained, the last
epoch kept), the original's symmetric weight scale; eval.py end to end."""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import flax.traverse_util  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax
import pytest
import torch

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


# ---- Token-Wise Clipping: a torch restatement of the original's search ---------------------------
@pytest.fixture(autouse=True)
def _torch_one_thread():
  """The restatement's tensors are tiny: torch's thread pool only adds overhead."""
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)

# Written from wimh966/outlier_suppression: solver/token_wise_clipping.py (cac_step_iters,
# find_ratio, calibrate), quantization/observer.py (remove_padding, prune_token,
# AvgPruneMinMaxObserver, calculate_qparams), quantization/util_quant.py (fake quantization).
def ref_step_iters(a_bit, bs, seq_token):
  step = 128 * 32 * 0.01 / bs / seq_token
  step = float(format(step, '.2g'))
  step = min(step, 0.01)
  return step, int({8: 0.1, 6: 0.3, 4: 0.9}[a_bit] / step)


def ref_remove_padding(x, lengths, seq_pos):
  """Valid tokens of every row (the first `length` of each), channels flattened."""
  pos = list(range(x.dim()))
  shape = x.shape
  pos.remove(seq_pos)
  if len(pos) == 3:
    x = x.permute(pos[0], seq_pos, pos[1], pos[2]).reshape(shape[pos[0]], shape[seq_pos], -1)
  if len(pos) == 2:
    x = x.permute(pos[0], seq_pos, pos[1])
  return torch.cat([seq[:int(n)] for n, seq in zip(lengths, x)], 0)


def ref_prune_token(value, ratio, is_probs):
  if is_probs:
    return value
  token_max, _ = value.max(1)
  token_min, _ = value.min(1)
  upper = torch.quantile(token_max.abs(), ratio)
  lower = -torch.quantile(token_min.abs(), ratio)
  up = token_max[torch.nonzero(token_max <= upper, as_tuple=True)[0]].max()
  lo = token_min[torch.nonzero(token_min >= lower, as_tuple=True)[0]].min()
  return torch.clip(value, max=up, min=lo)


def ref_observe(xs, lengths, ratio, is_probs, seq_pos):
  """AvgPruneMinMaxObserver over the batches: per batch prune, then the running mean."""
  min_val = max_val = None
  for cnt, (x, n) in enumerate(zip(xs, lengths)):
    if x.dim() == 2:           # no token axis: observed without the mask, never pruned
      v = x
    else:
      v = ref_prune_token(ref_remove_padding(x, n, seq_pos), ratio, is_probs)
    mn, mx = torch.aminmax(v)
    if min_val is None:
      min_val, max_val = mn, mx
    else:
      min_val = (min_val * cnt + mn) / (cnt + 1)
      max_val = (max_val * cnt + mx) / (cnt + 1)
  return min_val, max_val


def ref_qparams(min_val, max_val, bit):
  quant_min, quant_max = 0, 2 ** bit - 1
  min_neg = torch.min(min_val, torch.zeros_like(min_val))
  max_pos = torch.max(max_val, torch.zeros_like(max_val))
  scale = torch.max((max_pos - min_neg) / float(quant_max - quant_min), torch.tensor(1e-8))
  zero_point = torch.clamp(quant_min - torch.round(min_neg / scale), quant_min, quant_max)
  return scale, zero_point


@dataclasses.dataclass(frozen=True)
class RefHooks:
  """Weights in floating point; the selected activation points either captured ('capture')
  or fake-quantized with the restated (scale, zero point) of the 'ref_q' collection (as
  util_quant.fake_quantize_per_tensor_affine / the LSQ+ forward with a rounded zero point)."""
  points: frozenset
  mode: str
  bits: int
  pooler_input: str = ''     # getitem_post_act_fake_quantize: token 0 of the last layer

  def weight(self, module, name, w):
    return w

  def dot_general(self, module, name, mask=None):
    return None

  def act(self, module, name, x, mask):
    if name not in self.points:
      return x
    if self.mode == 'capture':
      module.put_variable('ref', name, x[:, 0] if name == self.pooler_input else x)
      return x
    p = module.get_variable('ref_q', name)
    s, z = p['scale'], jnp.round(p['zero_point'])
    x_int = jnp.clip(jnp.round(x / s) + z, 0, 2 ** self.bits - 1)
    return (x_int - z) * s


def ref_batch_loss(q_logits, fp_logits, mask):
  """MSELoss on the logits (per-sequence logits: all; per-token: the valid tokens)."""
  if q_logits.ndim == 2:
    return float(np.mean(np.square(q_logits - fp_logits)))
  m = mask.astype(bool)
  return float(np.mean(np.square(q_logits[m] - fp_logits[m])))


def test_twc_step_iters_and_ratios_as_the_original():
  for bits, bs, seq in [(8, 32, 128), (6, 32, 128), (4, 32, 128), (6, 64, 128), (6, 50, 128),
                        (8, 256, 512), (6, 4, 12), (4, 3, 1000)]:
    step, iters = os_.twc_step_iters(bits, bs, seq)
    assert (step, iters) == ref_step_iters(bits, bs, seq), (bits, bs, seq)
    r = os_.candidate_ratios(bits, bs, seq)
    np.testing.assert_array_equal(r, np.float32([1.0 - step * i for i in range(iters)]))
  assert [len(os_.candidate_ratios(b)) for b in (8, 6, 4)] == [10, 30, 90]
  assert os_.twc_step_iters(6, 64, 128) == (0.005, 60)
  assert os_.twc_step_iters(6, 50, 128) == (0.0064, 46)
  assert len(os_.candidate_ratios(6, step=0.05, iters=3)) == 3


def test_twc_rule_matches_the_originals_prune_token():
  rng = np.random.default_rng(0)
  rule = jax.jit(os_.twc_ratio_ranges)
  lengths = np.array([20, 13, 17, 9])
  for trial in range(3):
    x = rng.standard_normal((4, 20, 8)).astype(np.float32)
    x[rng.integers(0, 4, 6), rng.integers(0, 9, 6), rng.integers(0, 8, 6)] = 40.0 * (trial + 1)
    x[1, 15:] = 1e4                               # padding never counts
    mask = np.arange(20)[None, :] < lengths[:, None]
    u, l, valid = os_.token_min_max(x, mask)
    ratios = os_.candidate_ratios(6)
    lo, hi = rule(u, l, valid, ratios)
    for c, p in enumerate(ratios):
      v = ref_prune_token(ref_remove_padding(torch.from_numpy(x), lengths, 1), float(p), False)
      mn, mx = torch.aminmax(v)
      assert float(lo[c]) == float(mn) and float(hi[c]) == float(mx), (trial, p)
  # (B, H, Tq, Tk): the token is the query, its channels heads x keys; the padded keys of
  # row 0 get values inside the row's range (the original keeps them, here they are masked)
  s = rng.random((2, 3, 6, 6)).astype(np.float32)
  s[0, :, :, 4:] = s[0, :, :, :4].mean(axis=(0, 2))[None, :, None]
  mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)
  u, l, valid = os_.token_min_max(s, mask)
  lo, hi = rule(u, l, valid, np.float32([0.8]))
  v = ref_prune_token(ref_remove_padding(torch.from_numpy(s), [4, 6], 2), 0.8, False)
  assert float(lo[0]) == float(v.min()) and float(hi[0]) == float(v.max())
  lo, hi = rule(u, l, np.zeros_like(valid), np.float32([1.0]))
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


def test_presets_are_the_originals_setting():
  for preset, bits in [(os_.PRESET, 6), (os_.PRESET_W8A8, 8)]:
    q = quant.config(**preset)
    r = quant.rules(q, _cfg('bert').replace(num_layers=2))
    on = {s.name for s in r.table() if s.enabled}
    assert {'eln', 'q0', 'k0', 'v0', 'p0', 'c0', 'x0', 'f0', 'z0', 'P'} <= on
    assert not on & {'s0', 'u0', 'g0', 'h0', 'y0', 'C', 'wx0', 'wz0', 'weln'}
    w, a = r.spec('wq0'), r.spec('x0')
    assert (w.n_bits, w.symmetric, w.granularity, w.estimator, w.x_neg) == \
        (bits, True, 'per_channel', 'current_minmax', True)
    assert (a.n_bits, a.symmetric, a.granularity) == (bits, False, 'per_tensor')
    assert (q.twc_fine, q.twc_lr, q.twc_epochs) == (True, 1e-5, 3)
  assert os_.CALIB_SAMPLES == 256


# ---- Token-Wise Clipping on planted outlier tokens ---------------------------------------------
SEP, OUT_DIMS, NEURON = 2, [3, 11], 5
W_BITS, A_BITS = 4, 6       # 4-bit weights: the search would see them if they were quantized


def _planted_outlier_tokens():
  """A one-layer BERT classifier whose FFN writes > 100 into two hidden dims at [SEP] tokens
  only (the original's setting: GLUE logits)."""
  model = models.build(_cfg('bert', num_layers=1, hidden_size=32, intermediate_size=64,
                           init_std=0.08, head='cls', num_labels=3))
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


@pytest.fixture(scope='module')
def twc_run():
  """outlier_suppression_method (Gamma Migration, TWC, the original's weight scale) with the
  last epoch kept, and the same with the best epoch kept."""
  model, variables = _planted_outlier_tokens()
  cal = _sep_batches(2, seed=1)
  qcfg = quant.config(**dict(os_.PRESET, n_bits=W_BITS, n_bits_act=A_BITS, est_num_batches=2,
                             twc_lr=1e-2, twc_epochs=3))
  last = os_.outlier_suppression_method(model, variables, cal, qcfg, return_info=True)
  best = os_.outlier_suppression_method(model, variables, cal, qcfg, return_info=True,
                                        fine_keep='best')
  mig, mv = quant.gamma_migration(model, variables)
  return mig, mv, cal, qcfg, last, best


@functools.lru_cache(maxsize=4)
def _fp_logits_fn(mig):
  fp = mig.clone(quant=None)
  return jax.jit(lambda v, ids, mask: fp.apply(v, ids, attention_mask=mask).logits)


def _capture(mig, mv, cal, points):
  cap = mig.clone(quant=RefHooks(frozenset(points), 'capture', A_BITS, 'z0'))
  run = jax.jit(lambda v, ids, mask: cap.apply(v, ids, attention_mask=mask, mutable=['ref'])[1])
  acts, fps = [], []
  for b in cal:
    ids, mask = jnp.asarray(b['input_ids']), jnp.asarray(b['attention_mask'])
    acts.append(run(mv, ids, mask)['ref'])
    fps.append(np.asarray(_fp_logits_fn(mig)(mv, ids, mask)))
  return acts, fps


@functools.lru_cache(maxsize=4)
def _ref_apply_fn(mig, points):
  m = mig.clone(quant=RefHooks(points, 'quant', A_BITS))
  return jax.jit(lambda v, rq, ids, mask: m.apply(dict(v, ref_q=rq), ids,
                                                  attention_mask=mask).logits)


def test_twc_coarse_ratio_equals_the_originals_search_with_fp_weights(twc_run):
  mig, mv, cal, qcfg, (qm, qv, info), _ = twc_run
  points = info['points']
  acts, fps = _capture(mig, mv, cal, points)
  flat = [{k[-1]: (k, v) for k, v in flax.traverse_util.flatten_dict(a).items()} for a in acts]
  lengths = [b['attention_mask'].sum(1) for b in cal]
  step, iters = ref_step_iters(A_BITS, BATCH, SEQ)
  apply = _ref_apply_fn(mig, frozenset(points))
  losses = []
  for i in range(iters):
    ratio = 1.0 - step * i
    rq = {}
    for name in points:
      xs = [torch.from_numpy(np.array(f[name][1])) for f in flat]
      is_probs = name.startswith('p')
      seq_pos = 2 if xs[0].dim() == 4 else 1
      scale, zp = ref_qparams(*ref_observe(xs, lengths, ratio, is_probs, seq_pos), A_BITS)
      rq[flat[0][name][0]] = {'scale': jnp.float32(scale.item()),
                              'zero_point': jnp.float32(zp.item())}
    rq = flax.traverse_util.unflatten_dict(rq)
    loss = 0.0
    for b, fp in zip(cal, fps):
      q = np.asarray(apply(mv, rq, jnp.asarray(b['input_ids']),
                           jnp.asarray(b['attention_mask'])))
      loss += ref_batch_loss(q, fp, b['attention_mask'])
    losses.append(loss)
  p, best = 0, 10000000
  for i, cur in enumerate(losses):
    if best > cur:
      best, p = cur, i
  ref_ratio = 1.0 - step * p
  print(f'TWC coarse ratio: ours {info["ratio"]:.2f}, restatement {ref_ratio:.2f} '
        f'(output MSE at ratio 1 {losses[0] / len(cal):.4g} -> {best / len(cal):.4g})')
  assert (info['step'], info['iters']) == (step, iters) == (0.01, 30)
  assert abs(info['ratio'] - ref_ratio) < 1e-6 and ref_ratio < 1.0
  np.testing.assert_allclose(np.asarray(info['coarse_mse']) * len(cal), losses, rtol=2e-3)
  assert losses[p] < 0.95 * losses[0]
  assert {'p0', 'z0', 'P', 'x0'} <= set(points)
  assert not {'p0', 'z0', 'P'} & set(info['clipped']) and 'x0' in info['clipped']


def test_twc_fine_stage_trains_every_act_quantizer_and_keeps_the_last_epoch(twc_run):
  mig, mv, cal, qcfg, (qm, qv, info), (_, qv_best, info_best) = twc_run
  assert set(info['learned']) == set(info['points']) and 'p0' in info['learned']
  state = qv['quant']['encoder_layer_0']['attention']['p0']
  # trained: the probabilities' scale moved away from its coarse start (calculate_qparams)
  lo, hi = info['coarse_ranges']['p0']
  s0, z0 = ref_qparams(torch.tensor(lo), torch.tensor(hi), A_BITS)
  assert float(z0) == 0.0 and 0.0 <= float(state['zero_point']) <= 2 ** A_BITS - 1
  assert abs(float(state['scale']) - float(s0)) > 1e-3 * float(s0), (state, float(s0))
  # last epoch kept: its MSE is the last of the per-epoch MSEs of the same training, which
  # here is not the best; fine_keep='best' keeps the minimum (or the coarse ranges)
  hist = info_best['fine_history']
  assert len(hist) == 3 and info['fine_kept'] and info['fine_mse'] == hist[-1]
  assert info_best['fine_mse'] == min(hist + [min(info['coarse_mse'])])
  assert info_best['fine_mse'] < info['fine_mse']
  # the returned parameters give the reported MSE with weights in floating point (restated
  # LSQ+ forward with the rounded zero point), and the returned model quantizes the weights
  rq = {}
  for path, v in flax.traverse_util.flatten_dict(qv['quant']).items():
    if path[-1] in ('scale', 'zero_point') and path[-2] in info['learned']:
      rq[path] = v
  rq = flax.traverse_util.unflatten_dict(rq)
  apply = _ref_apply_fn(mig, frozenset(info['learned']))
  q_apply = jax.jit(lambda v, ids, mask: qm.apply(v, ids, attention_mask=mask).logits)
  mse_fp_w, mse_q = [], []
  for b in cal:
    ids, mask = jnp.asarray(b['input_ids']), jnp.asarray(b['attention_mask'])
    f = np.asarray(_fp_logits_fn(mig)(mv, ids, mask))
    mse_fp_w.append(ref_batch_loss(np.asarray(apply(mv, rq, ids, mask)), f, b['attention_mask']))
    mse_q.append(ref_batch_loss(np.asarray(q_apply(qv, ids, mask)), f,
                                b['attention_mask']))
  print(f'TWC output MSE (weights FP): coarse {min(info["coarse_mse"]):.4g}, fine per epoch '
        f'{", ".join(f"{h:.4g}" for h in hist)}; kept: last {info["fine_mse"]:.4g}, best '
        f'{info_best["fine_mse"]:.4g}; W{W_BITS}A{A_BITS} model {np.mean(mse_q):.4g}')
  np.testing.assert_allclose(np.mean(mse_fp_w), info['fine_mse'], rtol=1e-3)
  assert np.mean(mse_q) > 1.5 * np.mean(mse_fp_w)


def test_weight_ranges_give_the_originals_symmetric_scale(twc_run):
  """Per output channel: s = absmax / ((q_max - q_min) / 2) on [-2^(b-1), 2^(b-1) - 1]
  (observer.py calculate_qparams, util_quant.fake_quantize_per_channel_affine)."""
  mig, mv, cal, qcfg, (qm, qv, info), _ = twc_run
  st = qv['quant']['encoder_layer_0']['intermediate']['wf0']
  w = np.asarray(qv['params']['encoder_layer_0']['intermediate']['kernel'])   # (in, out)
  wt = torch.from_numpy(w.T.copy())                                           # torch (out, in)
  qmin, qmax = -2 ** (W_BITS - 1), 2 ** (W_BITS - 1) - 1
  absmax = torch.max(-torch.clamp(wt.min(1).values, max=0), torch.clamp(wt.max(1).values, min=0))
  scale = torch.clamp(absmax / (float(qmax - qmin) / 2), min=1e-8)
  ref = (torch.clamp(torch.round(wt / scale[:, None]), qmin, qmax) * scale[:, None]).numpy().T
  class Kernel(flax.linen.Module):     # the frozen hooks' weight path on the stored state
    @flax.linen.compact
    def __call__(self, k):
      return qm.quant.weight(self, 'wf0', k)

  got = np.asarray(Kernel().apply({'quant': {'wf0': st}}, jnp.asarray(w)))
  np.testing.assert_array_equal(got, ref)
  assert float(np.abs(got - w).max()) > 0


def test_twc_rejects_dynamic_and_bad_fields():
  from oqt_jax.errors import ConfigError
  model = models.build(_cfg('opt', num_layers=1))
  variables = models.init_variables(model, jax.random.PRNGKey(0), seq_len=SEQ)
  with pytest.raises(ConfigError, match=r'^quant\.dynamic'):
    quant.token_wise_clipping(model, variables, _batches(1), quant.config(dynamic=True))
  with pytest.raises(ValueError, match='fine_keep'):
    quant.token_wise_clipping(model, variables, _batches(1), quant.config(), fine_keep='first')
  for kw, field in [(dict(twc_lr=0.0), 'quant.twc_lr'), (dict(twc_epochs=0), 'quant.twc_epochs'),
                    (dict(twc_fine=1), 'quant.twc_fine')]:
    with pytest.raises(ConfigError, match='^' + field.replace('.', r'\.')):
      quant.config(**kw)


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
