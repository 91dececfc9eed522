"""absmax / zero-point int8 (the article's formulas, restated in numpy) and weight-only int8."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oqt_jax import models, quant
from oqt_jax.quant import weight_int8


def np_absmax(x, axis=None):
  """The article: scale = 127 / max|X|; X_quant = round(scale X); X_dequant = X_quant / scale."""
  scale = 127 / np.max(np.abs(x), axis=axis, keepdims=True)
  x_q = np.round(scale * x)
  return x_q, scale, x_q / scale


def np_zeropoint(x, axis=None):
  """The article: x_range = max - min (1 if 0); scale = 255 / x_range;
  zeropoint = round(-scale min - 128); X_quant = clip(round(X scale + zeropoint), -128, 127);
  X_dequant = (X_quant - zeropoint) / scale."""
  x_range = np.max(x, axis=axis, keepdims=True) - np.min(x, axis=axis, keepdims=True)
  x_range = np.where(x_range == 0, 1, x_range)
  scale = 255 / x_range
  zp = np.round(-scale * np.min(x, axis=axis, keepdims=True) - 128)
  x_q = np.clip(np.round(x * scale + zp), -128, 127)
  return x_q, scale, zp, (x_q - zp) / scale


@pytest.fixture(scope='module')
def weights():
  rng = np.random.default_rng(0)
  w = rng.normal(0, 0.2, (24, 40)).astype(np.float32)
  w[3, 7] = 2.5            # an outlier: per tensor it coarsens everything, vector-wise one slice
  w[:, 11] += 0.3          # a shifted column: zero-point helps
  return w


@pytest.mark.parametrize('axis', [None, 0, 1, (0, 1)])
def test_absmax_matches_the_article(weights, axis):
  x_q, scale = quant.absmax_quantize(weights, axis=axis)
  ref_q, ref_s, ref_dq = np_absmax(weights.astype(np.float64), axis)
  assert x_q.dtype == jnp.int8 and scale.shape == ref_s.shape
  np.testing.assert_allclose(np.asarray(scale), ref_s, rtol=1e-6)
  assert np.array_equal(np.asarray(x_q, np.int64), ref_q.astype(np.int64))
  dq = np.asarray(quant.absmax_dequantize(x_q, scale))
  np.testing.assert_allclose(dq, ref_dq, rtol=1e-5, atol=1e-7)
  assert np.all(np.abs(dq - weights) <= 0.5 / ref_s + 1e-6)      # half a step at most


@pytest.mark.parametrize('axis', [None, 0, 1])
def test_zeropoint_matches_the_article(weights, axis):
  x_q, scale, zp = quant.zeropoint_quantize(weights, axis=axis)
  ref_q, ref_s, ref_zp, ref_dq = np_zeropoint(weights.astype(np.float64), axis)
  assert x_q.dtype == jnp.int8
  np.testing.assert_allclose(np.asarray(scale), ref_s, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(zp), ref_zp)
  assert np.array_equal(np.asarray(x_q, np.int64), ref_q.astype(np.int64))
  assert int(np.min(x_q)) == -128 and int(np.max(x_q)) == 127 if axis is None else True
  dq = np.asarray(quant.zeropoint_dequantize(x_q, scale, zp))
  np.testing.assert_allclose(dq, ref_dq, rtol=1e-5, atol=1e-6)


def test_vector_wise_is_finer_than_per_tensor_and_constant_slices_are_safe(weights):
  err = lambda axis: np.mean(np.abs(np.asarray(quant.absmax_dequantize(
      *quant.absmax_quantize(weights, axis=axis))) - weights))
  assert err(0) < 0.7 * err(None)          # one scale per column isolates the outlier
  z = np.zeros((3, 4), np.float32)
  z[1] = 5.0
  x_q, s = quant.absmax_quantize(z, axis=1)
  assert np.all(np.isfinite(np.asarray(s))) and np.array_equal(np.asarray(x_q)[0], np.zeros(4))
  x_q, s, zp = quant.zeropoint_quantize(z, axis=1)
  np.testing.assert_allclose(np.asarray(quant.zeropoint_dequantize(x_q, s, zp)), z, atol=1e-6)


@pytest.fixture(scope='module', params=['bert', 'opt'])
def tiny(request):
  mt = request.param
  cfg = models.ModelConfig(model_type=mt, vocab_size=96, hidden_size=32, num_layers=2,
                           num_heads=4, intermediate_size=64, max_position_embeddings=32,
                           gate='conditional_per_token', pad_token_id=0 if mt == 'bert' else 1)
  model = models.build(cfg)
  return model, models.init_variables(model, jax.random.PRNGKey(0))


def test_weight_only_int8_model(tiny):
  model, variables = tiny
  qmodel, qvars = quant.weight_only(model, variables)
  sites = [s for s in weight_int8.weight_sites(model, variables) if s.kind in ('dense', 'embed')]
  flat = jax.tree_util.tree_flatten_with_path(qvars['params'])[0]
  keys = {tuple(k.key for k in p): v for p, v in flat}
  # Every Dense kernel and table is int8 with one scale per output channel; the rest stays FP
  # (attention-gate kernels included: they never go through the weight hook).
  expect = 0
  for p, v in keys.items():
    site = next((s for s in sites if s.path == p), None)
    if site is None:
      assert v.dtype == jnp.float32, p
      expect += v.size * 4
    else:
      assert v.dtype == jnp.int8, p
      expect += v.size + 4 * v.shape[site.channel_axis]
  # 2 layers x (Q, K, V, out, FFN1, FFN2) + tables (+ BERT's MLM transform Dense)
  assert len(sites) == (12 + 3 + 1 if model.cfg.model_type == 'bert' else 12 + 2)
  assert any('gate' in p for p in keys)
  before, after = weight_int8.param_bytes(variables), weight_int8.param_bytes(qvars)
  assert after == expect and before == sum(v.size * 4 for v in jax.tree_util.tree_leaves(
      variables['params']))
  assert after < 0.35 * before
  # The nominal size of 8-bit per-channel weights is what is stored.
  assert weight_int8.model_bytes(model, variables, lambda s: 8 if s.kind != 'layernorm'
                                 else None) == after
  # The dequantized weights are the absmax round trip; outputs close to FP.
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 2, 96)
  mask = jnp.ones((2, 12), jnp.int32).at[1, 9:].set(0)
  fp = model.apply(variables, ids, attention_mask=mask).logits
  q = qmodel.apply(qvars, ids, attention_mask=mask).logits
  assert float(jnp.max(jnp.abs(q - fp))) < 0.03 * float(jnp.max(jnp.abs(fp)))
  assert float(jnp.max(jnp.abs(q - fp))) > 0                   # it did quantize
