"""AdaRound (quant/methods/adaround.py): its formulas against a numpy restatement of the paper
(rectified sigmoid, init of a, regulariser, cosine beta annealing), and on a trained tiny OPT at
4 bits: every Dense layer's output error is below round-to-nearest with the same range, the
rounding is decided (< 1% of h(a) in (0.01, 0.99)), and the result is an ordinary quantized
model whose weight quantizers map the rounded weights to themselves."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from oqt_jax import models, quant
from oqt_jax.quant import quantizers
from oqt_jax.quant.hooks import weight_reduce_axes
from oqt_jax.quant.methods import adaround as ar
from oqt_jax.train import losses

ZETA, GAMMA = 1.1, -0.1


def np_h(a):
  return np.clip(1 / (1 + np.exp(-a)) * (ZETA - GAMMA) + GAMMA, 0, 1)


def test_rectified_sigmoid_and_init_match_numpy():
  a = np.linspace(-12, 12, 1001).astype(np.float32)
  np.testing.assert_allclose(np.asarray(ar.rectified_sigmoid(a)), np_h(a), rtol=1e-6, atol=1e-6)
  assert float(ar.rectified_sigmoid(-20.0)) == 0.0 and float(ar.rectified_sigmoid(20.0)) == 1.0
  w_over_s = np.random.default_rng(0).normal(0, 5, 500).astype(np.float32)
  r = w_over_s - np.floor(w_over_s)
  a0 = np.asarray(ar.init_alpha(w_over_s))
  np.testing.assert_allclose(a0, -np.log((ZETA - r) / (r - GAMMA)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np_h(a0), r, atol=1e-5)      # the soft weight starts at w


def test_regularizer_and_beta_annealing_match_numpy():
  h = np.random.default_rng(1).uniform(0, 1, 300).astype(np.float32)
  for beta in (20.0, 7.3, 2.0):
    np.testing.assert_allclose(float(ar.regularizer(h, beta)),
                               np.sum(1 - np.abs(2 * h - 1) ** beta), rtol=1e-5)
  assert float(ar.regularizer(np.array([0.0, 1.0, 1.0]), 2.0)) == 0.0
  iters, warmup = 1000, 0.2
  for i in (0, 100, 200, 350, 600, 999, 1000):
    rel = min(max((i - warmup * iters) / (iters - warmup * iters), 0), 1)
    want = 2 + 0.5 * (20 - 2) * (1 + math.cos(math.pi * rel))
    assert float(ar.beta_at(i, iters, warmup, (20, 2))) == pytest.approx(want, rel=1e-5)
  assert float(ar.beta_at(0, iters, warmup)) == pytest.approx(20)
  assert float(ar.beta_at(iters, iters, warmup)) == pytest.approx(2)


# ---------------------------------------------------------------------------- on a trained model
VOCAB, SEQ, BATCH = 64, 16, 16


def _bigram_batches(n, seed):
  """Sequences of a fixed random bigram chain (learnable), with a few padded rows."""
  table = np.random.default_rng(123).integers(0, VOCAB, (VOCAB, 2))
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = np.zeros((BATCH, SEQ), np.int32)
    ids[:, 0] = rng.integers(0, VOCAB, BATCH)
    for t in range(1, SEQ):
      ids[:, t] = table[ids[:, t - 1], rng.integers(0, 2, BATCH)]
    mask = np.ones_like(ids)
    mask[0, SEQ // 2:] = 0                      # padding must stay out of the statistics
    out.append({'input_ids': ids, 'attention_mask': mask, 'labels': ids})
  return out


@pytest.fixture(scope='module')
def trained():
  cfg = models.from_config(dict(model_type='opt', vocab_size=VOCAB, hidden_size=32, num_layers=1,
                                num_heads=2, intermediate_size=64, max_position_embeddings=32,
                                hidden_dropout=0.0, attention_dropout=0.0, activation='relu',
                                pad_token_id=1))
  model = models.build(cfg)
  params = models.init_variables(model, jax.random.PRNGKey(0))['params']
  data = _bigram_batches(8, 0)
  stacked = {k: jnp.asarray(np.stack([b[k] for b in data])) for k in data[0]}
  tx = optax.adam(1e-2)

  def loss(p, b):
    out = model.apply({'params': p}, b['input_ids'], attention_mask=b['attention_mask'])
    return losses.mean_loss(*losses.clm_loss(out.logits, b['labels'], b['attention_mask']))

  @jax.jit
  def train(p):
    def step(carry, i):
      p, o = carry
      b = jax.tree.map(lambda x: x[i % 8], stacked)
      l, g = jax.value_and_grad(loss)(p, b)
      u, o = tx.update(g, o, p)
      return (optax.apply_updates(p, u), o), l
    (p, _), ls = jax.lax.scan(step, (p, tx.init(p)), jnp.arange(300))
    return p, ls
  params, ls = train(params)
  assert float(ls[-10:].mean()) < float(ls[:10].mean()) - 1.0     # it learned the chain
  return model, {'params': params}, data


@pytest.fixture(scope='module')
def rounded(trained):
  model, variables, data = trained
  qcfg = quant.config(n_bits=4, n_bits_act=8, est_num_batches=2, adaround_iters=500,
                      adaround_samples=32, adaround_lr=1e-2, adaround_lambda=0.1)
  return quant.adaround(model, variables, data, qcfg, progress=False, with_report=True)


def test_every_layer_beats_round_to_nearest_and_rounding_is_decided(rounded):
  _, _, reports = rounded
  assert [r.point for r in reports] == ['wq0', 'wk0', 'wv0', 'wg0', 'wf0', 'wh0']   # forward order
  for r in reports:
    assert r.mse_adaround < r.mse_nearest, r
    assert r.soft_fraction < 0.01, r
    assert 0.01 < r.flipped_fraction < 0.5, r       # it did change roundings
    h = r.h
    assert np.mean((h > 0.01) & (h < 0.99)) == pytest.approx(r.soft_fraction)


def test_result_is_an_ordinary_quantized_model(trained, rounded):
  model, variables, data = trained
  qmodel, qvars, reports = rounded
  flat_p = traverse_util.flatten_dict(qvars['params'])
  flat_q = traverse_util.flatten_dict(qvars['quant'])
  rules = qmodel.quant.rules
  for r in reports:
    path = tuple(r.path.split('/'))
    w = flat_p[path + ('kernel',)]
    x_min, x_max = flat_q[path + (r.point, 'x_min')], flat_q[path + (r.point, 'x_max')]
    axes = weight_reduce_axes(r.point, w, rules.per_channel)
    x_min = quantizers.expand_range(x_min, w.ndim, axes)
    x_max = quantizers.expand_range(x_max, w.ndim, axes)
    again = quantizers.quantize_dequantize(w, 4, True, x_min, x_max)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(w))   # re-quantizing: identity
    s, _, _, _ = quantizers.scale_zero_point(x_min, x_max, 4, True)
    levels = np.unique(np.round(np.asarray(w) / np.asarray(s)))
    assert len(levels) <= 16
    fp = traverse_util.flatten_dict(variables['params'])[path + ('kernel',)]
    v = np.asarray(fp) / np.asarray(s)
    inside = (v >= -8) & (v <= 7)              # not clipped by the MSE range: floor or ceil
    assert inside.mean() > 0.9
    dist = np.abs(np.asarray(w) - np.asarray(fp)) / np.asarray(s)
    assert np.max(dist[inside]) <= 1 + 1e-4
  b = data[0]
  out = qmodel.apply(qvars, b['input_ids'], attention_mask=b['attention_mask'])
  assert np.isfinite(np.asarray(out.logits)).all()
