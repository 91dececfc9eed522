"""LSQ / LSQ+ quantizers (quant/methods/lsq.py) against a torch autograd restatement of the
formulas of Esser et al. 2020 (LSQ) and Bhalgat et al. 2020 / Outlier Suppression (LSQ+),
including the gradient scale g = 1 / sqrt(numel * q_max)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from oqt_jax.quant.methods import lsq


def _t_round(v):            # STE round (torch.round is half-to-even like jnp.round)
  return (torch.round(v) - v).detach() + v


def _t_gscale(v, g):        # forward v, gradient * g
  return (v - v * g).detach() + v * g


def torch_lsq(x, s, q_min, q_max, g):
  s = _t_gscale(s, g)
  return _t_round(torch.clamp(x / s, q_min, q_max)) * s


def torch_lsq_plus(x, s, z, q_min, q_max, g):
  s = _t_gscale(s, g)
  z = torch.clamp(_t_round(_t_gscale(z, g)), q_min, q_max)
  return (torch.clamp(_t_round(x / s + z), q_min, q_max) - z) * s


def _away_from_ties(x, s, z=0.0):
  """Move values whose x/s + z is within 1e-3 of a rounding tie (float32 noise territory)."""
  v = x / s + z
  frac = v - np.floor(v)
  return np.where(np.abs(frac - 0.5) < 1e-3, x + 0.01 * s, x)


def _grads_jax(fn, x, *params, w):
  def loss(x, *p):
    return jnp.sum(fn(x, *p) * w)
  out = fn(x, *params)
  grads = jax.grad(loss, argnums=tuple(range(1 + len(params))))(x, *params)
  return np.asarray(out), [np.asarray(g) for g in grads]


def _grads_torch(fn, x, *params, w):
  tx = torch.tensor(np.asarray(x), requires_grad=True)
  tp = [torch.tensor(np.asarray(p), requires_grad=True) for p in params]
  out = fn(tx, *tp)
  (out * torch.tensor(np.asarray(w))).sum().backward()
  return out.detach().numpy(), [tx.grad.numpy()] + [p.grad.numpy() for p in tp]


@pytest.mark.parametrize('n_bits,per_channel', [(4, False), (8, False), (4, True)])
def test_lsq_gradients_match_torch(n_bits, per_channel):
  rng = np.random.default_rng(n_bits + per_channel)
  x = rng.normal(0, 1, (16, 8)).astype(np.float32)
  if per_channel:
    s = rng.uniform(0.05, 0.3, (1, 8)).astype(np.float32)
  else:
    s = np.float32(0.2 if n_bits == 4 else 0.01)
  x = _away_from_ties(x, s).astype(np.float32)
  w = rng.normal(0, 1, x.shape).astype(np.float32)
  q_min, q_max = -2.0 ** (n_bits - 1), 2.0 ** (n_bits - 1) - 1
  numel = x.size // (8 if per_channel else 1)
  g = 1.0 / math.sqrt(numel * q_max)                   # restated, not taken from lsq.py
  assert lsq.grad_factor(x, q_max, 8 if per_channel else 1) == pytest.approx(g, rel=1e-12)
  jg = None if not per_channel else lsq.grad_factor(x, q_max, 8)
  out, grads = _grads_jax(lambda x, s: lsq.lsq_quantize(x, s, n_bits, g=jg), x, s, w=w)
  t_out, t_grads = _grads_torch(lambda x, s: torch_lsq(x, s, q_min, q_max, g), x, s, w=w)
  np.testing.assert_allclose(out, t_out, rtol=1e-6, atol=1e-7)
  # Both clamped and unclamped values occur, so every branch of the gradient is exercised.
  v = x / s
  assert (v < q_min).any() or (v > q_max).any()
  assert ((v > q_min) & (v < q_max)).any()
  for a, b in zip(grads, t_grads):
    np.testing.assert_allclose(np.reshape(a, np.shape(b)), b, rtol=1e-5, atol=1e-6)
  # The scale's gradient really carries g: without it, it is 1/g times larger.
  _, raw = _grads_torch(lambda x, s: torch_lsq(x, s, q_min, q_max, 1.0), x, s, w=w)
  np.testing.assert_allclose(np.reshape(grads[1], np.shape(raw[1])), raw[1] * g, rtol=1e-5,
                             atol=1e-7)


@pytest.mark.parametrize('n_bits,z', [(4, 5.3), (8, 100.6), (4, 17.0)])
def test_lsq_plus_gradients_match_torch(n_bits, z):
  rng = np.random.default_rng(n_bits)
  x = rng.normal(0.3, 1.0, (32, 4)).astype(np.float32)
  q_min, q_max = 0.0, 2.0 ** n_bits - 1
  s = np.float32(0.25 if n_bits == 4 else 0.015)
  z = np.float32(z)          # 17 > q_max=15: the zero-point is clamped to the grid
  x = _away_from_ties(x, s, np.clip(np.round(z), q_min, q_max)).astype(np.float32)
  w = rng.normal(0, 1, x.shape).astype(np.float32)
  g = 1.0 / math.sqrt(x.size * q_max)
  out, grads = _grads_jax(lambda x, s, z: lsq.lsq_plus_quantize(x, s, z, n_bits), x, s, z, w=w)
  t_out, t_grads = _grads_torch(lambda x, s, z: torch_lsq_plus(x, s, z, q_min, q_max, g),
                                x, s, z, w=w)
  np.testing.assert_allclose(out, t_out, rtol=1e-6, atol=1e-6)
  for a, b in zip(grads, t_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  if z < q_max:
    assert abs(float(grads[2])) > 0      # clamped values give the zero-point a gradient
  else:
    assert float(grads[2]) == 0.0        # a clamped zero-point gets none


def test_gradient_scale_forward_is_exact_and_scales_gradient():
  v = jnp.asarray(np.random.default_rng(0).uniform(1e-3, 1.0, 1000), jnp.float32)
  g = 0.0317
  np.testing.assert_array_equal(np.asarray(lsq.gradient_scale(v, g)), np.asarray(v))
  grad = jax.grad(lambda v: jnp.sum(lsq.gradient_scale(v, g) ** 2))(v)
  np.testing.assert_allclose(np.asarray(grad), 2 * np.asarray(v) * g, rtol=1e-6)


def test_init_from_range_reproduces_the_calibrated_quantizer():
  from oqt_jax.quant import quantizers
  rng = np.random.default_rng(1)
  x = rng.normal(0.5, 2.0, (64, 16)).astype(np.float32)
  x_min, x_max = np.float32(-1.7), np.float32(4.2)
  s, z = lsq.init_from_range(x_min, x_max, 8, symmetric=False)
  ref = quantizers.quantize_dequantize(x, 8, False, x_min, x_max)
  np.testing.assert_allclose(np.asarray(lsq.lsq_plus_quantize(x, s, z, 8)), np.asarray(ref),
                             rtol=1e-5, atol=1e-5)
  s, z = lsq.init_from_range(x_min, x_max, 4, symmetric=True)
  ref = quantizers.quantize_dequantize(x, 4, True, x_min, x_max)
  np.testing.assert_allclose(np.asarray(lsq.lsq_quantize(x, s, 4)), np.asarray(ref),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('acts', ['asymmetric_uniform', 'symmetric_uniform'])
def test_lsq_plus_learns_no_zero_point_for_symmetric_quantizers(acts):
  """qat.to_learned('lsq+'): a symmetric quantizer (the weights; the activations with
  qmethod_acts='symmetric_uniform') gets a scale and no zero-point, and it quantizes as the
  calibrated symmetric quantizer; an asymmetric one gets both."""
  from oqt_jax import models, quant
  from oqt_jax.quant import quantizers
  from oqt_jax.quant.hooks import QuantHooks
  from oqt_jax.quant.methods import qat
  qcfg = quant.config(n_bits=4, qmethod_acts=acts, qat=True, learn_ranges='lsq+')
  rules = quant.rules(qcfg, models.from_config(dict(model_type='bert', num_layers=1)))
  rng = np.random.default_rng(0)
  state = {'layer': {n: {'x_min': jnp.float32(-rng.uniform(0.5, 2)),
                         'x_max': jnp.float32(rng.uniform(0.5, 2)), 'n': jnp.int32(1)}
                     for n in ('wq0', 'h0')}}
  learned = qat.to_learned(state, rules, 'lsq+')
  sym_h = acts == 'symmetric_uniform'
  assert 'zero_point' not in learned['layer']['wq0']
  assert ('zero_point' in learned['layer']['h0']) != sym_h
  assert set(qat.split(learned, 'lsq+')['layer']['h0']) == (
      {'scale'} if sym_h else {'scale', 'zero_point'})
  x = jnp.asarray(rng.normal(0, 1.5, (8, 16)), jnp.float32)
  hooks = QuantHooks.build(qcfg, models.from_config(dict(model_type='bert', num_layers=1)),
                           mode='learned', learn_ranges='lsq+')
  for n in ('wq0', 'h0'):
    st = state['layer'][n]
    spec = rules.spec(n)
    ref = quantizers.quantize_dequantize(x, spec.n_bits, spec.symmetric, st['x_min'],
                                         st['x_max'])
    got = hooks._lsq(learned['layer'][n], x, (0, 1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)
