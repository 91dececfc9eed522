"""Tests of oqt_jax.quant.estimators against plain NumPy / SciPy restatements."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from oqt_jax.quant import estimators as E

F32 = np.float32
HUGE = F32(1e6)


def np_qdq(x, b, symmetric, x_min, x_max):
  """The quantizer in float32 NumPy (REFERENCE section 2)."""
  x = np.asarray(x, F32)
  x_min = np.minimum(np.asarray(x_min, F32), F32(0))
  x_max = np.maximum(np.asarray(x_max, F32), F32(1e-8))
  if symmetric:
    signed = bool((x_min < 0).any())
    q_min, q_max = (-2.0 ** (b - 1), 2.0 ** (b - 1) - 1) if signed else (0.0, 2.0 ** b - 1)
    s = np.maximum(np.maximum(-x_min, x_max) / F32(q_max), F32(1e-8))
    z = F32(0)
  else:
    q_min, q_max = 0.0, 2.0 ** b - 1
    s = np.maximum((x_max - x_min) / F32(q_max), F32(1e-8))
    z = np.clip(np.round(-x_min / s), F32(q_min), F32(q_max))
  return s * (np.clip(np.round(x / s) + z, F32(q_min), F32(q_max)) - z)


def np_sq_err(x, b, symmetric, lo, hi):
  return float(np.sum((np_qdq(x, b, symmetric, lo, hi).astype(np.float64) - x) ** 2))


def _batches(n=3, shape=(4, 8, 6), seed=0):
  """Batches with a (B, T) padding mask; padded positions hold +-1e6."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    x = (rng.standard_normal(shape) * (1 + i)).astype(F32)
    mask = rng.random(shape[:2]) < 0.7
    mask[0, 0] = True
    x[~mask] = np.where(rng.random(x[~mask].shape) < 0.5, -HUGE, HUGE)
    out.append((x, mask))
  return out


def _valid(x, mask, per_embd):
  """Valid entries: (N,) per tensor, (N, D) per embedding."""
  v = x[mask]                       # (n_valid_tokens, D)
  return v if per_embd else v.reshape(-1)


@pytest.mark.parametrize('per_embd', [False, True])
def test_minmax_estimators_vs_numpy(per_embd):
  axes = (0, 1) if per_embd else None
  shape = (6,) if per_embd else ()
  m = 0.9
  states = {k: E.init_state(shape) for k in ('current_minmax', 'running_minmax', 'allminmax')}
  ref_run = ref_all = None
  for i, (x, mask) in enumerate(_batches()):
    for k in states:
      states[k] = E.update(k, states[k], x, mask=mask, reduce_axes=axes, momentum=m)
    v = _valid(x, mask, per_embd)
    b_min, b_max = v.min(axis=0), v.max(axis=0)
    if i == 0:
      ref_run = [b_min, b_max]
      ref_all = [b_min, b_max]
    else:
      ref_run = [F32(1 - m) * b + F32(m) * r for b, r in zip((b_min, b_max), ref_run)]
      ref_all = [np.minimum(ref_all[0], b_min), np.maximum(ref_all[1], b_max)]
    cur = states['current_minmax']
    np.testing.assert_array_equal(np.asarray(cur['x_min']), b_min)
    np.testing.assert_array_equal(np.asarray(cur['x_max']), b_max)
    np.testing.assert_allclose(np.asarray(states['running_minmax']['x_min']), ref_run[0],
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(states['running_minmax']['x_max']), ref_run[1],
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(states['allminmax']['x_min']), ref_all[0])
    np.testing.assert_array_equal(np.asarray(states['allminmax']['x_max']), ref_all[1])
  for st in states.values():
    assert int(st['n']) == 3 and st['x_min'].shape == shape and st['n'].dtype == jnp.int32
    # Padding (+-1e6) never entered the statistics.
    assert np.all(np.abs(np.asarray(st['x_min'])) < 100)
    assert np.all(np.abs(np.asarray(st['x_max'])) < 100)


@pytest.mark.parametrize('per_embd', [False, True])
def test_percentile_both_tails_vs_numpy(per_embd):
  axes = (0, 1) if per_embd else (0, 1, 2)
  p, m = 95.0, 0.9
  state = E.init_state((6,) if per_embd else ())
  ref = None
  for i, (x, mask) in enumerate(_batches(n=2)):
    state = E.update('percentile', state, x, mask=mask, reduce_axes=axes, percentile=p,
                     momentum=m)
    v = _valid(x, mask, per_embd)
    lo, hi = np.percentile(v.astype(np.float64), (100 - p, p), axis=0)
    # Both tails are clipped: strictly inside the batch's min / max.
    assert np.all(lo > v.min(axis=0)) and np.all(hi < v.max(axis=0))
    ref = [lo, hi] if i == 0 else [(1 - m) * a + m * r for a, r in zip((lo, hi), ref)]
    np.testing.assert_allclose(np.asarray(state['x_min']), ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state['x_max']), ref[1], rtol=1e-5, atol=1e-6)


def np_grid_candidates(mn, mx, b, symmetric, n=100, margin=0.5, one_sided=None):
  """The documented grid rule, restated in float64."""
  one_sided = mn >= 0 if one_sided is None else one_sided
  r1 = max(abs(mn), mx) + margin
  if symmetric or one_sided:
    return [(0.0 if one_sided else -r1 / n * k, r1 / n * k) for k in range(1, n + 1)]
  pos_lim, neg_lim = mx + margin, mn - margin
  step = max(abs(pos_lim), abs(neg_lim)) / n
  n_shift = min(2 ** b // 4, 64)
  stride = (2 ** b // 4) / n_shift
  out = []
  for k in range(1, n + 1):
    half = step * k
    delta = 2 * half / (2 ** b - 1)
    for j in range(n_shift):
      for sign in (1, -1):
        skew = sign * j * stride * delta
        out.append((max(-half + skew, neg_lim), min(half + skew, pos_lim)))
  return out


def _ulp_neighbours(c, k=2):
  """c and the float32 values up to k ulps on either side."""
  c = F32(c)
  out = [c]
  lo = hi = c
  for _ in range(k):
    lo, hi = np.nextafter(lo, F32(-np.inf)), np.nextafter(hi, F32(np.inf))
    out += [lo, hi]
  return out


def _check_grid_choice(v, lo, hi, b, symmetric, one_sided=None, loss=None):
  """The chosen range is a grid candidate whose loss is the grid's minimum.

  The search computes its candidates in float32, a few ulps from the float64 rule, and the
  loss jumps where a range edge moves the zero-point's rounding; so each candidate's loss is
  taken as its worst over +-2 ulps of either edge (the value the search evaluated is among
  them), and the chosen range must not lose to any candidate so taken.
  """
  loss = loss or (lambda lo, hi: np_sq_err(v, b, symmetric, lo, hi))
  cands = np_grid_candidates(float(v.min()), float(v.max()), b, symmetric,
                             one_sided=one_sided)
  losses = np.array([loss(c0, c1) for c0, c1 in cands])
  dist = [abs(c0 - lo) + abs(c1 - hi) for c0, c1 in cands]
  i = int(np.argmin(dist))
  assert dist[i] < 1e-5 * (1 + abs(lo) + abs(hi)), 'chosen range is not a grid candidate'
  chosen = loss(lo, hi)
  # Only candidates below the chosen loss can beat it (a worst case is never lower).
  worst = [max(loss(a, b_) for a in _ulp_neighbours(c0) for b_ in _ulp_neighbours(c1))
           for (c0, c1), l in zip(cands, losses) if l < chosen]
  best = min(worst, default=np.inf)
  assert chosen <= best * (1 + 1e-5) + 1e-9, (chosen, best, losses.min())
  return losses


@pytest.mark.parametrize('symmetric', [True, False])
def test_mse_grid_per_channel_vs_bruteforce(symmetric):
  rng = np.random.default_rng(1)
  w = (rng.standard_normal((24, 4)) * [[0.1, 1.0, 3.0, 0.5]]).astype(F32)
  w[:, 3] = np.abs(w[:, 3])              # a one-sided channel
  w[0, 1] = 6.0                          # an outlier that is worth clipping
  b = 4
  st = E.update('mse', E.init_state((4,)), w, reduce_axes=(0,), n_bits=b, symmetric=symmetric)
  lo, hi = np.asarray(st['x_min']), np.asarray(st['x_max'])
  tensor_one_sided = bool(w.min() >= 0)   # symmetric: one grid type for the whole tensor
  for c in range(4):
    # Symmetric: the one-sided decision (hence the grid type) is the whole tensor's;
    # asymmetric: each channel's own.
    one_sided = tensor_one_sided if symmetric else None
    _check_grid_choice(w[:, c], lo[c], hi[c], b, symmetric, one_sided=one_sided)
  assert hi[1] < 6.0                     # the outlier got clipped
  if not symmetric:
    assert lo[3] == 0.0                  # one-sided channel: [0, t]


def test_mse_grid_asymmetric_two_sided_per_tensor_with_mask():
  b = 4
  (x, mask), = _batches(n=1, seed=3)
  x = np.where(x > 0, x * 3, x).astype(F32)          # skewed: asymmetry pays off
  x[0, 0, 0] = 40.0                                   # a valid outlier: clipping pays off
  x[~mask] = HUGE
  st = E.update('mse', E.init_state(), x, mask=mask, n_bits=b, symmetric=False)
  v = x[mask].reshape(-1)
  losses = _check_grid_choice(v, float(st['x_min']), float(st['x_max']), b, False)
  assert len(losses) == 100 * 4 * 2
  # The same search on the valid entries alone: padding did not matter.
  st2 = E.update('mse', E.init_state(), v, n_bits=b, symmetric=False)
  np.testing.assert_allclose([st['x_min'], st['x_max']], [st2['x_min'], st2['x_max']],
                             rtol=1e-5)
  # Better than plain min/max at 4 bits, with a clipped maximum.
  assert float(st['x_max']) < 40.0
  assert np_sq_err(v, b, False, st['x_min'], st['x_max']) < np_sq_err(
      v, b, False, v.min(), v.max())


@pytest.mark.parametrize('symmetric,per_channel,positive', [
    (True, True, False), (True, False, True), (False, True, False)])
def test_mse_grid_block_losses_and_choice_vs_numpy(monkeypatch, symmetric, per_channel,
                                                   positive):
  """The blocked loss evaluation and the chunked grid search against a plain NumPy search:
  every candidate's loss (float32 quantizer, valid entries only) and the first best one.
  Tiny blocks force several tiles, slice groups, candidate chunks and padding."""
  monkeypatch.setattr(E, 'MSE_BLOCK_ELEMENTS', 96)
  monkeypatch.setattr(E, 'MSE_TILE', 8)
  rng = np.random.default_rng(11)
  b, n_cand = 3, 9
  x = (rng.standard_normal((37, 5)) * [0.2, 1.0, 2.0, 0.7, 1.5]).astype(F32)
  x[:, 3] = np.abs(x[:, 3])                       # a one-sided slice
  x[2, 1] = 7.0                                   # an outlier worth clipping
  if positive:                                    # symmetric: the unsigned grid
    x = np.abs(x)
  mask = rng.random((37, 1)) < 0.8                # a token mask, broadcast along the slices
  x[~mask[:, 0]] = HUGE
  axes = (0,) if per_channel else None
  slices = [x[mask[:, 0], c] for c in range(5)] if per_channel else [x[mask[:, 0]].reshape(-1)]
  st = E.update('mse', E.init_state((5,) if per_channel else ()), x, mask=mask,
                reduce_axes=axes, n_bits=b, symmetric=symmetric, num_candidates=n_cand)
  got = np.stack([np.atleast_1d(np.asarray(st[k])) for k in ('x_min', 'x_max')], 1)

  mn = np.array([v.min() for v in slices], F32)
  mx = np.array([v.max() for v in slices], F32)
  one_sided = np.full(len(slices), bool(mn.min() >= 0)) if symmetric else mn >= 0
  lo, hi = (np.asarray(a) for a in E.grid_candidates(
      jnp.asarray(mn), jnp.asarray(mx), jnp.asarray(one_sided), n_bits=b, symmetric=symmetric,
      num_candidates=n_cand, margin=0.5))
  # The candidates follow the documented rule (float64 restatement).
  for c in range(len(slices)):
    ref = np_grid_candidates(float(mn[c]), float(mx[c]), b, symmetric, n=n_cand,
                             one_sided=bool(one_sided[c]))
    rows = slice(0, n_cand) if (symmetric or one_sided[c]) else slice(n_cand, None)
    np.testing.assert_allclose(np.stack([lo[rows, c], hi[rows, c]], 1), ref, rtol=1e-6,
                               atol=1e-7)
  # Every candidate's loss from the blocked evaluation equals NumPy's.
  rows_x = jnp.asarray(x.T if per_channel else x.reshape(1, -1))
  rows_m = jnp.asarray(np.broadcast_to(mask, x.shape).T if per_channel
                       else np.broadcast_to(mask, x.shape).reshape(1, -1))
  m = lo.shape[0]
  f = jax.jit(lambda r, w, lo, hi: E._mse_losses_for(r, w, b, symmetric)(3)(lo, hi))
  ours = np.concatenate([np.asarray(f(rows_x, rows_m, lo[i:i + 3], hi[i:i + 3]))  # 3 per call:
                         for i in range(0, m, 3)])                      # slice groups too
  for c, v in enumerate(slices):
    if symmetric:   # one grid type for the whole quantizer, as the search evaluates it
      ref = [_np_sym_err(v, b, lo[i], hi[i], c) for i in range(m)]
    else:
      ref = [np_sq_err(v, b, False, lo[i, c], hi[i, c]) for i in range(m)]
    np.testing.assert_allclose(ours[:, c], ref, rtol=2e-5, atol=1e-9)
    # The search's choice: the first candidate with the smallest loss among the usable
    # ones (1-D for one-sided slices, 2-D for the others, asymmetric).
    usable = np.ones(m, bool) if symmetric else (np.arange(m) < n_cand) == one_sided[c]
    ref = np.where(usable, ref, np.inf)
    best = int(np.argmin(ref))
    near = np.nonzero(ref <= ref[best] * (1 + 1e-6) + 1e-12)[0]    # float ties
    assert any(np.allclose(got[c], [lo[i, c], hi[i, c]], rtol=1e-6, atol=1e-7)
               for i in near), (c, got[c], lo[best, c], hi[best, c])


def _np_sym_err(v, b, lo_row, hi_row, c):
  """Squared error of slice c under a symmetric candidate row: the grid is signed iff any
  slice's candidate minimum is negative (one integer type per quantizer)."""
  signed = bool((lo_row < 0).any())
  q_min, q_max = (-2.0 ** (b - 1), 2.0 ** (b - 1) - 1) if signed else (0.0, 2.0 ** b - 1)
  s = np.maximum(np.maximum(-np.minimum(lo_row[c], F32(0)), np.maximum(hi_row[c], F32(1e-8)))
                 / F32(q_max), F32(1e-8))
  q = s * np.clip(np.round(v / s), F32(q_min), F32(q_max))
  return float(np.sum((q.astype(np.float64) - v) ** 2))


def _scipy_golden_sym(v, b, margin=0.5):
  r = max(abs(float(v.min())), float(v.max())) + margin
  res = minimize_scalar(lambda t: np_sq_err(v, b, True, -t, t), bounds=(0.01 * r, r),
                        method='bounded')
  return res.x, res.fun


def _scipy_golden_asym(v, b, margin=0.5):
  r_max = max(abs(float(v.max()) + margin), abs(float(v.min()) - margin))
  skew = 2 ** b // 4

  def inner(r):
    m = 2 * r / (2 ** b - 1) * skew
    return minimize_scalar(lambda sh: np_sq_err(v, b, False, -r + sh, r + sh), bounds=(-m, m),
                           method='bounded')

  res = minimize_scalar(lambda r: inner(r).fun, bounds=(0.01 * r_max, r_max), method='bounded')
  sh = inner(res.x)
  return (-res.x + sh.x, res.x + sh.x), sh.fun


def test_mse_golden_vs_scipy():
  rng = np.random.default_rng(4)
  b = 4
  v = rng.standard_normal(2048).astype(F32)
  st = E.update('mse', E.init_state(), v, n_bits=b, symmetric=True, mse_search='golden')
  t_ref, l_ref = _scipy_golden_sym(v, b)
  t = float(st['x_max'])
  assert float(st['x_min']) == -t
  l_ours = np_sq_err(v, b, True, -t, t)
  assert l_ours <= l_ref * 1.01 and abs(t - t_ref) / t_ref < 0.05, (t, t_ref, l_ours, l_ref)
  # Clearly better than min/max at 4 bits.
  assert l_ours < 0.8 * np_sq_err(v, b, True, v.min(), v.max())

  skewed = (rng.gamma(2.0, 1.0, 2048) - 1.0).astype(F32)    # asymmetric, two-sided
  st = E.update('mse', E.init_state(), skewed, n_bits=b, symmetric=False, mse_search='golden')
  (lo_ref, hi_ref), l_ref = _scipy_golden_asym(skewed, b)
  l_ours = np_sq_err(skewed, b, False, st['x_min'], st['x_max'])
  assert l_ours <= l_ref * 1.02, (float(st['x_min']), float(st['x_max']), lo_ref, hi_ref)
  assert l_ours < 0.9 * np_sq_err(skewed, b, False, skewed.min(), skewed.max())


def _np_ce(x, target, b, symmetric, lo, hi):
  def log_softmax(z):
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  p = np.exp(log_softmax(target))
  return float(-(p * log_softmax(np_qdq(x, b, symmetric, lo, hi))).sum())


def test_cross_entropy_grid_vs_bruteforce():
  rng = np.random.default_rng(5)
  b = 3
  logits = (rng.standard_normal((16, 10)) * 3).astype(F32)
  logits[0, 0] = 25.0
  st = E.update('cross_entropy', E.init_state(), logits, n_bits=b, symmetric=True)
  loss = lambda lo, hi: _np_ce(logits, logits, b, True, lo, hi)
  _check_grid_choice(logits.reshape(-1), float(st['x_min']), float(st['x_max']), b, True,
                     loss=loss)
  # logits_target: the target distribution comes from other (FP) logits.
  target = (logits + rng.standard_normal(logits.shape)).astype(F32)
  st = E.update('cross_entropy', E.init_state(), logits, n_bits=b, symmetric=True,
                logits_target=target)
  loss = lambda lo, hi: _np_ce(logits, target, b, True, lo, hi)
  _check_grid_choice(logits.reshape(-1), float(st['x_min']), float(st['x_max']), b, True,
                     loss=loss)


def test_update_jits_with_static_flags():
  (x, mask), = _batches(n=1, seed=6)
  f = jax.jit(functools.partial(E.update, 'mse', reduce_axes=(0, 1), n_bits=4, symmetric=True,
                                num_candidates=20))
  got = f(E.init_state((6,)), x, mask=mask)
  want = E.update('mse', E.init_state((6,)), x, mask=mask, reduce_axes=(0, 1), n_bits=4,
                  symmetric=True, num_candidates=20)
  for k in ('x_min', 'x_max', 'n'):
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
  assert np.all(np.abs(np.asarray(got['x_max'])) < 100)     # padding excluded
  # A traced momentum is fine too.
  g = jax.jit(lambda s, x, m: E.update('running_minmax', s, x, momentum=m))
  s = g(E.init_state(), x[:1, :1], 0.5)
  s = g(s, x[:1, :1] * 0 + 1.0, 0.5)
  assert float(s['x_max']) == pytest.approx(0.5 * 1.0 + 0.5 * float(x[0, 0].max()))


def test_fully_masked_channel_keeps_state():
  x = np.arange(12, dtype=F32).reshape(2, 6)
  mask = np.ones((2, 6), bool)
  st = E.update('running_minmax', E.init_state((6,)), x, mask=mask, reduce_axes=(0,))
  mask2 = mask.copy()
  mask2[:, 2] = False
  st2 = E.update('running_minmax', st, x + 100, mask=mask2, reduce_axes=(0,))
  assert float(st2['x_min'][2]) == float(st['x_min'][2]) == 2.0
  assert float(st2['x_min'][0]) == pytest.approx(0.1 * 100 + 0.9 * 0.0)
  assert int(st2['n']) == 2


def test_bad_arguments():
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match='kind'):
    E.update('median', E.init_state(), x)
  with pytest.raises(ValueError, match='shape'):
    E.update('current_minmax', E.init_state((3,)), x)
  with pytest.raises(ValueError, match='class axis'):
    E.update('cross_entropy', E.init_state((3,)), x, reduce_axes=(0,))
  with pytest.raises(ValueError, match='mse_search'):
    E.update('mse', E.init_state(), x, mse_search='newton')
  with pytest.raises(ValueError):
    E.update('current_minmax', E.init_state(), x, n_bits=1)
  assert set(E.ESTIMATORS) == {'current_minmax', 'running_minmax', 'allminmax', 'percentile',
                               'mse', 'cross_entropy'}


@pytest.mark.parametrize('kind', ['running_minmax', 'percentile', 'mse', 'allminmax'])
def test_batch_without_valid_tokens_is_not_seen(kind):
  """An all-padding batch changes nothing: the next valid batch initialises the state (it is
  not blended with the zero initial state) and the count stays."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=(2, 4, 3)).astype(np.float32) + 5.0     # far from the zero state
  b = rng.normal(size=(2, 4, 3)).astype(np.float32) * 3.0
  none = np.zeros((2, 4), bool)
  upd = lambda st, x, m=None: E.update(kind, st, x, mask=m, percentile=99.0)
  s0 = E.init_state(())
  s_empty = upd(s0, b, none)
  assert int(s_empty['n']) == 0
  s1 = upd(s_empty, a)
  want = upd(s0, a)
  assert int(s1['n']) == 1
  np.testing.assert_array_equal(np.asarray(s1['x_min']), np.asarray(want['x_min']))
  np.testing.assert_array_equal(np.asarray(s1['x_max']), np.asarray(want['x_max']))
  if kind == 'running_minmax':   # numpy: the first valid batch initialises
    assert float(s1['x_min']) == pytest.approx(a.min()) and float(s1['x_max']) == a.max()
  s2 = upd(upd(s1, b, none), b)
  want2 = upd(want, b)
  assert int(s2['n']) == 2
  np.testing.assert_allclose(np.asarray(s2['x_min']), np.asarray(want2['x_min']), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s2['x_max']), np.asarray(want2['x_max']), rtol=1e-6)


def test_mse_grid_signed_grid_on_non_negative_data():
  """signed=True (quant.symmetric_signed): the search is over [-t, t] on the signed grid even
  for a non-negative tensor (a ReLU output); by default that tensor gets [0, t] unsigned."""
  rng = np.random.default_rng(4)
  v = np.abs(rng.standard_normal(200)).astype(F32)
  v[3] = 7.0
  b = 4
  st = E.update('mse', E.init_state(), v, n_bits=b, symmetric=True, signed=True)
  lo, hi = float(st['x_min']), float(st['x_max'])
  assert lo == -hi < 0
  _check_grid_choice(v, lo, hi, b, True, one_sided=False)
  st = E.update('mse', E.init_state(), v, n_bits=b, symmetric=True)
  assert float(st['x_min']) == 0.0
