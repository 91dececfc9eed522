"""Tests of oqt_jax.quant.quantizers against a NumPy restatement of the formulas."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oqt_jax.quant import quantizers as Q

F32 = np.float32
EPS = F32(1e-8)
BITS = range(2, 17)


def np_qdq(x, b, symmetric, x_min, x_max):
  """REFERENCE section 2 in float32 NumPy, same operation order as the JAX code."""
  codes, q_min, q_max, s, z = np_int_codes(x, b, symmetric, x_min, x_max)
  return s * (np.clip(codes, q_min, q_max) - z)


def np_int_codes(x, b, symmetric, x_min, x_max):
  """(round(x/s) + z before clamping, q_min, q_max, s, z) in float32 NumPy."""
  x_min = np.minimum(np.asarray(x_min, F32), F32(0))
  x_max = np.maximum(np.asarray(x_max, F32), EPS)
  if symmetric:
    signed = bool((x_min < 0).any())
    q_min, q_max = (F32(-2 ** (b - 1)), F32(2 ** (b - 1) - 1)) if signed else (F32(0),
                                                                                F32(2 ** b - 1))
    s = np.maximum(np.maximum(np.abs(x_min), x_max) / q_max, EPS)
    z = np.zeros_like(s)
  else:
    q_min, q_max = F32(0), F32(2 ** b - 1)
    s = np.maximum((x_max - x_min) / q_max, EPS)
    z = np.clip(np.round(-x_min / s), q_min, q_max)
  return np.round(np.asarray(x, F32) / s) + z, q_min, q_max, s, z


def _data(seed, shape, scale, positive=False):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * scale).astype(F32)
  if x.size > 2:           # exact zeros and a duplicate of the max
    x.flat[0] = 0.0
    x.flat[1] = x.max()
  return np.abs(x) if positive else x


FLAT = 256


@jax.jit
def _qdq_all_bits_flat(x, x_min, x_max):
  return {(b, sym): Q.quantize_dequantize(x, b, sym, x_min, x_max)
          for b in BITS for sym in (False, True)}


def _check_all_bits(x, x_min, x_max):
  """quantize_dequantize == the NumPy restatement, bitwise, for 2..16 bits, both modes.

  The formulas are elementwise once the ranges are broadcast, so the JAX side runs on x and
  the broadcast ranges flattened and zero-padded to FLAT entries: one compilation serves
  every shape hypothesis draws (zero padding adds no negative x_min, so the symmetric grid
  type is unchanged). The NumPy reference uses the original shapes and broadcasting;
  `test_broadcast_granularities` runs quantize_dequantize itself on the real shapes.
  """
  x = np.asarray(x, F32)
  x_min, x_max = np.asarray(x_min, F32), np.asarray(x_max, F32)
  assert x.size <= FLAT
  flat = lambda a: np.pad(np.broadcast_to(a, x.shape).ravel(), (0, FLAT - x.size))
  got_all = _qdq_all_bits_flat(flat(x), flat(x_min), flat(x_max))
  for (b, sym), got in got_all.items():
    want = np_qdq(x, b, sym, x_min, x_max)
    got = np.asarray(got)[:x.size].reshape(x.shape)
    np.testing.assert_array_equal(got, want, err_msg=f'bits={b} symmetric={sym}')


shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)
settings = hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                               database=None)


@settings
@hypothesis.given(shape=shapes, seed=st.integers(0, 2 ** 16),
                  scale=st.sampled_from([1e-3, 1.0, 37.0]), positive=st.booleans(),
                  shrink=st.sampled_from([1.0, 0.5]))
def test_per_tensor_matches_numpy(shape, seed, scale, positive, shrink):
  x = _data(seed, shape, scale, positive)
  # shrink < 1 narrows the range so that clamping happens at both ends.
  x_min, x_max = F32(x.min() * shrink), F32(x.max() * shrink)
  _check_all_bits(x, x_min, x_max)        # positive data: the unsigned symmetric grid


@settings
@hypothesis.given(n_in=st.integers(1, 8), n_out=st.integers(1, 8), seed=st.integers(0, 2 ** 16),
                  keep_dim=st.booleans())
def test_per_channel_weights_match_numpy(n_in, n_out, seed, keep_dim):
  w = _data(seed, (n_in, n_out), 0.05)
  axes = Q.reduce_axes_for('per_channel', 2)           # kernel (in, out): reduce `in`
  assert axes == (0,)
  x_min, x_max = w.min(axis=axes), w.max(axis=axes)
  if keep_dim:
    x_min, x_max = x_min[None], x_max[None]             # (1, out)
  _check_all_bits(w, x_min * F32(0.8), x_max * F32(0.8))


@settings
@hypothesis.given(shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 8)),
                  seed=st.integers(0, 2 ** 16), positive=st.booleans())
def test_per_embedding_matches_numpy(shape, seed, positive):
  x = _data(seed, shape, 2.0, positive)
  axes = Q.reduce_axes_for('per_embd', 3)
  assert axes == (0, 1)
  _check_all_bits(x, x.min(axis=axes), x.max(axis=axes) * F32(0.9))


def np_group_ranges(x_min_d, x_max_d, n_groups, perm=None):
  d = x_min_d.shape[0]
  order = np.arange(d) if perm is None else np.asarray(perm)
  gmin, gmax = np.empty(d, F32), np.empty(d, F32)
  for g in range(n_groups):
    dims = order[g * d // n_groups:(g + 1) * d // n_groups]
    gmin[dims], gmax[dims] = x_min_d[dims].min(), x_max_d[dims].max()
  return gmin, gmax


@hypothesis.settings(settings, max_examples=15)
@hypothesis.given(kd=st.sampled_from([(1, 4), (4, 4), (3, 12), (4, 12)]),
                  seed=st.integers(0, 2 ** 16), permute=st.booleans())
def test_per_embedding_group_matches_numpy(kd, seed, permute):
  k, d = kd
  per_group = d // k
  x = _data(seed, (2, 3, d), 1.0)
  x[..., ::3] *= 20.0                                    # some wide dims
  x_min_d, x_max_d = x.min(axis=(0, 1)), x.max(axis=(0, 1))
  perm = np.asarray(Q.peg_permutation(x_max_d - x_min_d, k)) if permute else None
  if permute:
    np.testing.assert_array_equal(perm, np.argsort(x_max_d - x_min_d, kind='stable'))
  gid = Q.group_index(d, k, None if perm is None else jnp.asarray(perm))
  g_min, g_max = Q.group_ranges(x_min_d, x_max_d, gid, k)
  want_min, want_max = np_group_ranges(x_min_d, x_max_d, k, perm)
  np.testing.assert_array_equal(np.asarray(g_min), want_min)
  np.testing.assert_array_equal(np.asarray(g_max), want_max)
  _check_all_bits(x, want_min, want_max)
  # group_view gives the same per-group ranges directly.
  view = np.asarray(Q.group_view(x, k, perm))
  assert view.shape == (2, 3, k, per_group)
  for g in range(k):
    dims = (np.arange(d) if perm is None else perm)[g * per_group:(g + 1) * per_group]
    assert view[..., g, :].min() == want_min[dims[0]]
    assert view[..., g, :].max() == want_max[dims[0]]


def test_broadcast_granularities():
  """quantize_dequantize on the real shapes of each granularity (no flattening)."""
  rng = np.random.default_rng(0)
  x3 = rng.standard_normal((2, 3, 4)).astype(F32) * F32([1.0, 5.0, 0.2, 2.0])
  w = rng.standard_normal((6, 4)).astype(F32) * F32([[1.0, 5.0, 0.2, 2.0]])
  axes0 = Q.reduce_axes_for('per_channel', 2, channel_axis=0)     # (out, in) layout
  assert axes0 == (1,)
  cases = {
      'per_tensor': (x3, x3.min() * F32(0.7), x3.max() * F32(0.7)),
      'per_embd': (x3, x3.min(axis=(0, 1)) * F32(0.7), x3.max(axis=(0, 1)) * F32(0.7)),
      'per_channel (out,)': (w, w.min(0) * F32(0.7), w.max(0) * F32(0.7)),
      'per_channel (1, out)': (w, w.min(0, keepdims=True), w.max(0, keepdims=True)),
      'per_channel axis 0': (w, np.asarray(Q.expand_range(w.min(axes0), 2, axes0)),
                             np.asarray(Q.expand_range(w.max(axes0), 2, axes0))),
  }
  assert cases['per_channel axis 0'][1].shape == (6, 1)
  bits = (3, 8)
  run = jax.jit(lambda cases: {(name, b, sym): Q.quantize_dequantize(x, b, sym, lo, hi)
                               for name, (x, lo, hi) in cases.items()
                               for b in bits for sym in (False, True)})
  for (name, b, sym), got in run(cases).items():
    x, lo, hi = cases[name]
    np.testing.assert_array_equal(np.asarray(got), np_qdq(x, b, sym, lo, hi),
                                  err_msg=f'{name} bits={b} symmetric={sym}')


def test_eager_matches_numpy_and_default_range():
  x = np.array([-1.7, -0.5, 0.0, 0.3, 1.0, 2.6], F32)
  for b in (2, 8, 16):
    for sym in (False, True):
      np.testing.assert_array_equal(np.asarray(Q.quantize_dequantize(x, b, sym)),
                                    np_qdq(x, b, sym, x.min(), x.max()))
      np.testing.assert_array_equal(np.asarray(Q.quantize_dequantize(x, b, sym, -1.0, 2.0)),
                                    np_qdq(x, b, sym, -1.0, 2.0))


def test_signed_and_unsigned_symmetric_grids():
  x = np.array([-1.0, -0.5, 0.0, 0.3, 1.0, 2.0], F32)
  s, z, q_min, q_max = Q.scale_zero_point(-1.0, 1.0, 8, True)
  assert (float(q_min), float(q_max)) == (-128.0, 127.0)
  np.testing.assert_allclose(float(s), 1.0 / 127, rtol=1e-7)
  s, z, q_min, q_max = Q.scale_zero_point(0.0, 2.0, 8, True)
  assert (float(q_min), float(q_max)) == (0.0, 255.0)
  np.testing.assert_allclose(float(s), 2.0 / 255, rtol=1e-7)
  # Unsigned grid: negative values clamp to 0.
  q = np.asarray(Q.quantize_dequantize(x, 8, True, 0.0, 2.0))
  assert q[0] == 0.0 and q[1] == 0.0
  # x_neg forces the grid type.
  _, _, q_min, _ = Q.scale_zero_point(0.0, 2.0, 8, True, x_neg=True)
  assert float(q_min) == -128.0
  # Asymmetric: zero point and grid.
  s, z, q_min, q_max = Q.scale_zero_point(-1.0, 3.0, 4, False)
  np.testing.assert_allclose(float(s), 4.0 / 15, rtol=1e-7)
  assert float(z) == 4.0 and (float(q_min), float(q_max)) == (0.0, 15.0)


def test_range_widened_to_contain_zero_and_eps():
  x = np.array([1.0, 2.0, 3.0, 3.0, 2.5, 1.5], F32)
  # x_min = 1 > 0 is widened to 0, so 0 stays exactly representable.
  s, z, _, _ = Q.scale_zero_point(1.0, 3.0, 8, False)
  assert float(z) == 0.0 and np.isclose(float(s), 3.0 / 255)
  np.testing.assert_array_equal(np.asarray(Q.quantize_dequantize(x, 8, False, 1.0, 3.0)),
                                np_qdq(x, 8, False, 0.0, 3.0))
  # Degenerate range: scale floored at eps, no NaN.
  q = np.asarray(Q.quantize_dequantize(np.zeros(6, F32), 8, False, 0.0, 0.0))
  assert np.all(q == 0.0)
  s, _, _, _ = Q.scale_zero_point(0.0, 0.0, 8, True)
  assert float(s) == F32(1e-8)


def test_returns_input_dtype():
  x = jnp.asarray(_data(2, (3, 8), 1.0), jnp.bfloat16)
  q = Q.quantize_dequantize(x, 8, False)
  assert q.dtype == jnp.bfloat16
  want = np_qdq(np.asarray(x, F32), 8, False, np.asarray(x, F32).min(), np.asarray(x, F32).max())
  np.testing.assert_array_equal(np.asarray(q, F32), want.astype(jnp.bfloat16).astype(F32))


def test_round_ste_and_clamp():
  v = jnp.array([-2.5, -0.5, 0.5, 1.5, 2.4], jnp.float32)
  np.testing.assert_array_equal(np.asarray(Q.round_ste(v)), [-2.0, -0.0, 0.0, 2.0, 2.0])
  np.testing.assert_array_equal(np.asarray(jax.grad(lambda v: Q.round_ste(v).sum())(v)),
                                np.ones(5))
  g = jax.grad(lambda v: Q.clamp(v, -1.0, 1.5).sum())(jnp.array([-2.0, -1.0, 0.0, 1.5, 3.0]))
  np.testing.assert_array_equal(np.asarray(g), [0, 1, 1, 1, 0])   # bounds count as inside


GRAD_CASES = [(b, sym) for b in (2, 4, 8, 16) for sym in (False, True)]


@jax.jit
def _grads_wrt_x(x, x_min, x_max):
  return {c: jax.grad(lambda x: Q.quantize_dequantize(x, c[0], c[1], x_min, x_max).sum())(x)
          for c in GRAD_CASES}


def test_ste_gradient_wrt_x():
  x = _data(11, (6, 10), 2.0)
  x[0, :4] = [-1e4, 1e4, -3e3, 3e3]                       # clamped even at 16 bits
  x_min, x_max = F32(x.min() * 0.4), F32(x.max() * 0.4)
  for (b, symmetric), g in _grads_wrt_x(x, x_min, x_max).items():
    v, q_min, q_max, _, _ = np_int_codes(x, b, symmetric, x_min, x_max)
    inside = ((v >= q_min) & (v <= q_max)).astype(F32)
    assert 0 < inside.sum() < inside.size, (b, symmetric)   # both cases present
    np.testing.assert_array_equal(np.asarray(g), inside, err_msg=f'{b} bits sym={symmetric}')


def test_lsq_gradient_symmetric():
  """d sum q / d x_max = sum(round(v) - v inside, q_min/q_max where clamped) / q_max."""
  x = _data(5, (200,), 1.0)
  b, x_max = 4, F32(1.3)
  x_min = -x_max * F32(0.5)       # |x_min| < x_max, so s = x_max / q_max
  g_min, g_max = jax.jit(jax.grad(
      lambda lo, hi: Q.quantize_dequantize(x, b, True, lo, hi).sum(), argnums=(0, 1)))(
          x_min, x_max)
  s = np.float64(x_max) / (2 ** (b - 1) - 1)
  v = x.astype(np.float64) / s
  r = np.round(v)
  q_min, q_max = -2.0 ** (b - 1), 2.0 ** (b - 1) - 1
  gs = np.where(r < q_min, q_min, np.where(r > q_max, q_max, r - v))
  assert (r > q_max).any() and (r < q_min).any()
  np.testing.assert_allclose(float(g_max), gs.sum() / q_max, rtol=1e-4)
  assert float(g_min) == 0.0                            # x_min does not set the scale here


def test_lsq_gradient_asymmetric():
  """Range gradients through s = (x_max - x_min)/q_max and z = round_ste(-x_min/s)."""
  x = _data(9, (300,), 1.0) + F32(0.3)
  b, x_min, x_max = 4, F32(-1.1), F32(1.7)
  g_min, g_max = jax.jit(jax.grad(
      lambda lo, hi: Q.quantize_dequantize(x, b, False, lo, hi).sum(), argnums=(0, 1)))(
          x_min, x_max)
  q_max = 2.0 ** b - 1
  s = (np.float64(x_max) - np.float64(x_min)) / q_max
  z = np.round(-np.float64(x_min) / s)
  v = x.astype(np.float64) / s
  c = np.round(v) + z
  lo, hi = c < 0, c > q_max
  assert lo.any() and hi.any()
  bound = np.where(lo, 0.0, q_max)
  clamped = lo | hi
  dq_ds = np.where(clamped, bound - z, np.round(v) - v)   # partial, z held fixed
  dq_dz = np.where(clamped, -s, 0.0)                      # inside, z cancels
  dl_ds = dq_ds.sum() + dq_dz.sum() * np.float64(x_min) / s ** 2
  dl_dmin_direct = dq_dz.sum() * (-1.0 / s)
  np.testing.assert_allclose(float(g_max), dl_ds / q_max, rtol=1e-4)
  np.testing.assert_allclose(float(g_min), -dl_ds / q_max + dl_dmin_direct, rtol=1e-4)
  assert np.isfinite(float(g_min)) and np.isfinite(float(g_max))


def test_gradients_per_channel_ranges_finite_under_jit():
  w = _data(4, (8, 5), 0.1)
  lo, hi = jnp.asarray(w.min(0) * 0.7), jnp.asarray(w.max(0) * 0.7)
  f = jax.jit(jax.grad(lambda w, lo, hi: jnp.sum(Q.quantize_dequantize(w, 4, True, lo, hi) ** 2),
                       argnums=(0, 1, 2)))
  gw, glo, ghi = f(w, lo, hi)
  assert gw.shape == w.shape and glo.shape == (5,) and ghi.shape == (5,)
  assert np.all(np.isfinite(np.asarray(ghi))) and np.any(np.asarray(ghi) != 0)


def test_auto_range_carries_no_gradient_to_range():
  x = _data(8, (30,), 1.0)
  g = jax.jit(jax.grad(lambda x: Q.quantize_dequantize(x, 8, False).sum()))(x)
  np.testing.assert_array_equal(np.asarray(g), np.ones_like(x))   # all inside, exactly 1


def _mse(a, b):
  return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def test_peg_with_planted_outliers():
  rng = np.random.default_rng(0)
  b, t, d, k = 4, 32, 64, 4
  x = rng.standard_normal((b, t, d)).astype(F32)
  outliers = [3, 17, 40]
  x[..., outliers] *= 100.0
  x_min_d, x_max_d = x.min(axis=(0, 1)), x.max(axis=(0, 1))
  perm = Q.peg_permutation(x_max_d - x_min_d, k)
  gid = np.asarray(Q.group_index(d, k, perm))
  assert len({int(gid[i]) for i in outliers}) == 1 and gid[outliers[0]] == k - 1
  assert np.bincount(gid).tolist() == [d // k] * k
  gid_plain = np.asarray(Q.group_index(d, k))
  assert len({int(gid_plain[i]) for i in outliers}) == 3

  @jax.jit
  def quantize_three(x, gid, gid_plain):
    return (Q.quantize_dequantize(x, 8, False, x.min(), x.max()),
            Q.quantize_dequantize(x, 8, False, *Q.group_ranges(x_min_d, x_max_d, gid, k)),
            Q.quantize_dequantize(x, 8, False, *Q.group_ranges(x_min_d, x_max_d, gid_plain, k)))

  q_tensor, q_peg, q_plain = quantize_three(x, gid, gid_plain)
  e_tensor, e_peg, e_plain = _mse(q_tensor, x), _mse(q_peg, x), _mse(q_plain, x)
  # One group of 16 dims keeps the coarse grid: about 4x lower error overall ...
  assert e_tensor / e_peg > 3.0
  # ... and the 61 normal dims get a ~100x finer grid: errors drop by ~10^4.
  normal = np.setdiff1d(np.arange(d), outliers)
  normal_tensor = _mse(np.asarray(q_tensor)[..., normal], x[..., normal])
  normal_peg = _mse(np.asarray(q_peg)[..., normal][..., gid[normal] != k - 1],
                    x[..., normal][..., gid[normal] != k - 1])
  assert normal_tensor / normal_peg > 1000.0
  # Un-permuted PEG spreads the outliers over 3 groups: permuted is clearly better.
  assert e_plain / e_peg > 2.0
  assert e_tensor > e_plain


def test_groups_must_divide_hidden_size():
  for call in (lambda: Q.peg_permutation(jnp.ones(10), 4), lambda: Q.group_index(10, 4),
               lambda: Q.group_view(jnp.ones((2, 10)), 4)):
    with pytest.raises(ValueError) as err:
      call()
    msg = str(err.value)
    assert '\n' not in msg and '10' in msg and '4' in msg


def test_reduce_axes_for():
  assert Q.reduce_axes_for('per_tensor', 3) == (0, 1, 2)
  assert Q.reduce_axes_for('per_embd', 3) == (0, 1)
  assert Q.reduce_axes_for('per_channel', 2) == (0,)
  assert Q.reduce_axes_for('per_channel', 4, channel_axis=1) == (0, 2, 3)
  assert Q.reduce_axes_for('per_embd_group', 3) == (0, 1)
  with pytest.raises(ValueError):
    Q.reduce_axes_for('per_row', 2)
  with pytest.raises(ValueError):
    Q.reduce_axes_for('per_channel', 2, channel_axis=2)


@pytest.mark.parametrize('bad', [1, 17, 8.0, True])
def test_bad_bits(bad):
  with pytest.raises(ValueError):
    Q.quantize_dequantize(jnp.ones(3), bad)


def test_true_divide_is_single_rounding_under_jit():
  # XLA rewrites a / broadcast(b) into a * (1 / b); true_divide must not be rewritten.
  a = np.random.default_rng(0).standard_normal(4096).astype(F32)
  b = F32(7.0)
  np.testing.assert_array_equal(np.asarray(jax.jit(Q.true_divide)(a, b)), a / b)
  per_channel = np.array([3.0, 7.0, 0.1, 11.0], F32)
  a2 = a.reshape(-1, 4)
  np.testing.assert_array_equal(np.asarray(jax.jit(Q.true_divide)(a2, per_channel)),
                                a2 / per_channel)
  # Numerator and divisor broadcast along different axes (candidates x elements), and a
  # scalar numerator over a divisor array.
  s3 = np.random.default_rng(1).uniform(0.01, 2.0, (5, 3)).astype(F32)
  x3 = a[:3 * 64].reshape(3, 64)
  got = jax.jit(lambda x, s: Q.true_divide(x[None], s[:, :, None]))(x3, s3)
  np.testing.assert_array_equal(np.asarray(got), x3[None] / s3[:, :, None])
  np.testing.assert_array_equal(np.asarray(jax.jit(Q.true_divide)(F32(1.7), s3)), F32(1.7) / s3)
  # The true division stays a division and fuses with the rest of the quantizer: compiled,
  # quantize_dequantize forms no array of x's size besides its result (no materialised
  # divisor or quotient).
  import re
  x = np.zeros((8, 64, 96), F32)
  for symmetric in (False, True):
    hlo = jax.jit(lambda x, lo, hi: Q.quantize_dequantize(x, 8, symmetric, lo, hi)).lower(
        x, F32(-1), F32(1)).compile().as_text()
    entry = hlo[hlo.index('\nENTRY'):]
    big = [l for l in entry.split('\n') if re.search(r'= f32\[8,64,96\]', l)
           and 'parameter(' not in l]
    assert len(big) == 1, big
    assert 'divide(' in hlo


def test_group_values_and_expand_group_ranges_vs_numpy():
  rng = np.random.default_rng(0)
  d, k = 12, 3
  x = rng.normal(size=(2, 5, d)).astype(np.float32)
  perm = rng.permutation(d)
  gid = np.asarray(Q.group_index(d, k, jnp.asarray(perm)))
  view = np.asarray(Q.group_values(x, gid, k))
  assert view.shape == (2, 5, k, d // k)
  for g in range(k):
    np.testing.assert_array_equal(view[..., g, :], x[..., np.flatnonzero(gid == g)])
  g_min = rng.normal(size=k).astype(np.float32)
  g_max = (rng.normal(size=k) + 3).astype(np.float32)
  lo, hi = Q.expand_group_ranges(g_min, g_max, gid)
  np.testing.assert_array_equal(np.asarray(lo), g_min[gid])
  np.testing.assert_array_equal(np.asarray(hi), g_max[gid])
