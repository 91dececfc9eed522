"""AdaRound (quant/methods/adaround.py) against a PyTorch restatement of transformer-quantization's
per-layer optimisation (its AdaRound quantizer, CombinedLoss / TempDecay and
optimize_local_loss, with torch.optim.Adam), written here from the original's formulas: the
same weights, inputs, initialisation and minibatch sequence give the same rounding variable
step for step, and the same decisions after 1000 steps; and on a tiny BERT in the original's
setting: every quantized weight (embedding tables and LayerNorm gammas included) is rounded,
in forward order, with the layer's activation function inside the target and the upstream
activations in floating point."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util

from oqt_jax import models, quant
from oqt_jax.quant import points, quantizers
from oqt_jax.quant.hooks import weight_reduce_axes
from oqt_jax.quant.methods import adaround as ar

ZETA, GAMMA = 1.1, -0.1


@pytest.fixture(scope='module', autouse=True)
def _one_torch_thread():
  """The restatement's many small ops: one thread (two spin against each other on 2 cores)."""
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


# ---- the original's formulas, restated in torch ------------------------------------------------
def t_hard_sigmoid(a):
  return torch.clamp(torch.sigmoid(a) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def t_temp_decay(t, iters, warmup, b_range=(20.0, 2.0)):
  """TempDecay (cosine) with its decay start at warmup * iters."""
  start, end = b_range
  t0 = warmup * iters
  if t < t0:
    return start
  rel = (t - t0) / (iters - t0)
  return end + 0.5 * (start - end) * (1 + np.cos(rel * np.pi))


def torch_adaround(kind, w, scale, q_min, q_max, x, target, indices, *, bias=None, act=None,
                   iters, lam=0.01, warmup=0.2, lr=1e-3, record=0, ln_eps=None):
  """The original's loop: alpha from -log((zeta - r) / (r - gamma)); per iteration (counted
  from 1) the soft-quantized layer on the minibatch, loss = mse(reduction='none').sum(1).mean()
  + [t >= warmup iters] * lam * sum(1 - (|h - 0.5| * 2)^b_t); torch.optim.Adam(lr).
  kind 'dense': w (out, in), F.linear + act; 'embed': F.embedding; 'ln': F.layer_norm of the
  raw input x with the soft gamma. Returns (final alpha, [alpha after step 1..record],
  [loss of step 1..record])."""
  w = torch.tensor(np.asarray(w))
  x = torch.tensor(np.asarray(x))
  target = torch.tensor(np.asarray(target))
  b = None if bias is None else torch.tensor(np.asarray(bias))
  scale = torch.tensor(np.asarray(scale), dtype=w.dtype)        # the quantizer's 0-d delta
  q_min, q_max = float(q_min), float(q_max)
  xs = w / scale
  x_floor = torch.floor(xs)
  rest = xs - x_floor
  alpha = torch.nn.Parameter(-torch.log((ZETA - rest) / (rest - GAMMA)))
  opt = torch.optim.Adam([alpha], lr=lr)
  alphas, losses = [], []
  for t in range(1, iters + 1):
    idx = torch.tensor(np.asarray(indices[t - 1]), dtype=torch.long)
    h = t_hard_sigmoid(alpha)
    wq = scale * torch.clamp(x_floor + h, q_min, q_max)
    if kind == 'dense':
      out = F.linear(x[idx], wq, b)
      if act == 'gelu':
        out = F.gelu(out)
      elif act == 'tanh':
        out = torch.tanh(out)
    elif kind == 'embed':
      out = F.embedding(x[idx], wq)
    else:
      out = F.layer_norm(x[idx], (w.shape[0],), wq, b, ln_eps)
    loss = F.mse_loss(out, target[idx], reduction='none').sum(1).mean()
    if t >= iters * warmup:
      bt = t_temp_decay(t, iters, warmup)
      loss = loss + lam * (1 - ((h - 0.5).abs() * 2).pow(bt)).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if t <= record:
      alphas.append(alpha.detach().numpy().copy())
      losses.append(float(loss))
  return alpha.detach().numpy(), alphas, losses


def _sym_grid(w, n_bits=4, frac=0.8):
  """Scale of a symmetric signed grid on frac * max|w|."""
  q_max = 2 ** (n_bits - 1) - 1
  return np.float32(frac * np.abs(w).max() / q_max), -float(q_max + 1), float(q_max)


# ---- the formulas ----------------------------------------------------------------------------
def test_rectified_sigmoid_init_regularizer_schedule_match_torch():
  a = np.linspace(-12, 12, 1001).astype(np.float32)
  at = torch.tensor(a, requires_grad=True)
  t_hard_sigmoid(at).sum().backward()
  np.testing.assert_allclose(np.asarray(ar.rectified_sigmoid(a)), t_hard_sigmoid(at).detach(),
                             rtol=1e-6, atol=1e-7)
  g = np.asarray(jax.grad(lambda v: ar.rectified_sigmoid(v).sum())(a))
  np.testing.assert_allclose(g, at.grad.numpy(), rtol=1e-5, atol=1e-7)
  # torch.clamp passes the gradient at the ends; jnp.clip would halve it
  ends = np.array([0.0, 1.0, 1.5, -0.5], np.float32)
  np.testing.assert_array_equal(
      np.asarray(jax.grad(lambda v: ar.torch_clamp(v, 0.0, 1.0).sum())(ends)), [1, 1, 0, 0])
  w_over_s = np.random.default_rng(0).normal(0, 5, 500).astype(np.float32)
  r = w_over_s - np.floor(w_over_s)
  a0 = np.asarray(ar.init_alpha(w_over_s))
  np.testing.assert_allclose(a0, -np.log((ZETA - r) / (r - GAMMA)), rtol=1e-5, atol=1e-5)
  h = np.random.default_rng(1).uniform(0, 1, 300).astype(np.float32)
  for beta in (20.0, 7.3, 2.0):
    want = (1 - ((torch.tensor(h) - 0.5).abs() * 2).pow(beta)).sum()
    assert float(ar.regularizer(h, beta)) == pytest.approx(float(want), rel=1e-5)
  s = ar.schedule(1000, 0.2, (20.0, 2.0), 0.01, 1e-3)
  t = np.arange(1, 1001)
  np.testing.assert_allclose(s['beta'], [t_temp_decay(i, 1000, 0.2) for i in t], rtol=1e-6)
  assert s['beta'][198] == 20 and s['beta'][199] == 20 and s['beta'][-1] == pytest.approx(2)
  np.testing.assert_array_equal(s['lam'] > 0, t >= 200)      # the regulariser from t = 200 on
  np.testing.assert_allclose(s['step'], 1e-3 / (1 - 0.9 ** t), rtol=1e-6)
  np.testing.assert_allclose(s['bc2'], np.sqrt(1 - 0.999 ** t), rtol=1e-6)


def test_reconstruction_loss_reduction():
  rng = np.random.default_rng(2)
  for shape in ((4, 5, 6), (4, 6)):
    a, b = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    want = F.mse_loss(torch.tensor(a), torch.tensor(b), reduction='none').sum(1).mean()
    assert float(ar.reconstruction_loss(a, b)) == pytest.approx(float(want), rel=1e-6)
  # (N, T, D): summed over the tokens, averaged over sequences and features
  a = np.ones((2, 3, 4), np.float32)
  assert float(ar.reconstruction_loss(a, 0 * a)) == 3.0


# ---- one layer, step for step ------------------------------------------------------------------
@pytest.fixture(scope='module')
def ffn1():
  """An FFN1-like layer (dense + GELU, 24 -> 40), 16 sequences of 4 tokens."""
  rng = np.random.default_rng(3)
  w = rng.normal(0, 0.3, (40, 24)).astype(np.float32)     # torch layout (out, in)
  b = rng.normal(0, 0.1, 40).astype(np.float32)
  x = rng.normal(0, 1, (16, 4, 24)).astype(np.float32)
  y = np.asarray(jax.nn.gelu(x @ w.T + b, approximate=False))
  s, q_min, q_max = _sym_grid(w)
  return w, b, x, y, s, q_min, q_max


def _ours(kind, w, s, q_min, q_max, x, y, idx, iters, **kw):
  return ar.optimise_layer(kind, w, s, 0.0, q_min, q_max, x, y, indices=idx, iters=iters, **kw)


def _f64(*arrays):
  return [np.asarray(a, np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating) else a
          for a in arrays]


def test_dense_gelu_step_for_step_with_torch_adam(ffn1):
  """In float64 on both sides (in float32 the two differ where a gradient is below float32
  resolution: Adam turns its rounding noise into steps of up to ~1e-5 lr)."""
  w, b, x, y, s, q_min, q_max = _f64(*ffn1)
  y = np.asarray(F.gelu(torch.tensor(x @ w.T + b)))
  iters = 50      # 10 steps without the regulariser, then beta annealed over 40
  idx = ar.random_sampler(0)(x.shape[0], iters, 8, 0)
  a_t, alphas_t, losses_t = torch_adaround('dense', w, s, q_min, q_max, x, y, idx, bias=b,
                                           act='gelu', iters=iters, record=iters)
  with jax.enable_x64(True):
    res = _ours('dense', w.T, s, q_min, q_max, x, y, idx, iters, bias=b, activation='gelu',
                trace=True, dtype=jnp.float64)
    res = jax.tree.map(np.asarray, res)
  alphas = res['alphas'].transpose(0, 2, 1)
  scale = np.abs(np.stack(alphas_t)).max()
  err = np.abs(alphas - np.stack(alphas_t)).max(axis=(1, 2)) / scale
  assert err.max() < 1e-5, err
  # the losses, from the step index: the regulariser joins at t = 10 (0.2 * 50)
  np.testing.assert_allclose(res['loss'], losses_t, rtol=1e-9)
  assert losses_t[9] - losses_t[8] > 1.0 > 0.1 > abs(losses_t[8] - losses_t[7])
  # alpha moved: the comparison is not of the initial values
  assert np.abs(alphas_t[-1] - res['a0'].T).max() > 1e-2


def test_decisions_after_1000_steps_match_torch(ffn1):
  w, b, x, y, s, q_min, q_max = ffn1
  iters = 1000
  idx = ar.random_sampler(1)(x.shape[0], iters, 8, 0)
  a_t, _, _ = torch_adaround('dense', w, s, q_min, q_max, x, y, idx, bias=b, act='gelu',
                             iters=iters)
  res = _ours('dense', w.T, s, q_min, q_max, x, y, idx, iters, bias=b, activation='gelu')
  a = np.asarray(res['alpha']).T
  mismatch = np.mean((a >= 0) != (a_t >= 0))
  assert mismatch <= 0.005, mismatch
  near = np.clip(np.round(w / s), q_min, q_max)
  hard = np.clip(np.floor(w / s) + (a_t >= 0), q_min, q_max)
  assert np.mean(hard != near) > 0.02          # AdaRound decided differently from nearest
  np.testing.assert_array_equal(np.asarray(res['w_hard']).T,
                                s * np.clip(np.floor(w / s) + (a >= 0), q_min, q_max))


@pytest.mark.parametrize('kind', ['pooler', 'embed', 'ln'])
def test_other_layer_kinds_step_for_step(kind):
  """The pooler (dense + tanh on (N, D) rows: the loss sums over features), an embedding
  table (ids in, rows out) and a LayerNorm gamma, 30 steps each."""
  rng = np.random.default_rng(4)
  iters, n = 30, 16
  eps = 1e-12
  if kind == 'pooler':
    w = rng.normal(0, 0.3, (20, 20)).astype(np.float32)
    b = rng.normal(0, 0.1, 20).astype(np.float32)
    x = rng.normal(0, 1, (n, 20)).astype(np.float32)
    y = np.tanh(x @ w.T + b)
    ours_w, ours_x, kw = w.T, x, dict(bias=b, activation='tanh')
    t_kw = dict(bias=b, act='tanh')
  elif kind == 'embed':
    w = rng.normal(0, 0.3, (30, 12)).astype(np.float32)
    x = rng.integers(0, 30, (n, 5)).astype(np.int32)
    y = w[x]
    ours_w, ours_x, kw, t_kw = w, x, {}, {}
    x = x.astype(np.int64)
  else:
    w = rng.normal(1.0, 0.3, 12).astype(np.float32)
    b = rng.normal(0, 0.1, 12).astype(np.float32)
    x = rng.normal(0, 2, (n, 5, 12))
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    # the target from a slightly different gamma (inputs of a quantized upstream network):
    # where the target is exactly reachable, the gradient is rounding noise that Adam
    # normalises to steps of up to lr, and the two sides part after a few steps
    y = xhat * (w * (1 + 0.05 * rng.normal(size=12))) + b
    ours_w, ours_x, kw = w, xhat, dict(bias=b)
    t_kw = dict(bias=b, ln_eps=eps)
  s, q_min, q_max = _sym_grid(w)
  w, x, y, ours_w, ours_x, s = _f64(w, x, y, ours_w, ours_x, s)
  t_kw = {k: _f64(v)[0] if k == 'bias' else v for k, v in t_kw.items()}
  idx = ar.random_sampler(5)(n, iters, 8, 0)
  t_kind = 'dense' if kind == 'pooler' else kind
  _, alphas_t, _ = torch_adaround(t_kind, w, s, q_min, q_max, x, y, idx, iters=iters,
                                  record=iters, **t_kw)
  with jax.enable_x64(True):
    res = _ours(t_kind, ours_w, s, q_min, q_max, ours_x, y, idx, iters, trace=True,
                dtype=jnp.float64, **kw)
    alphas = np.asarray(res['alphas'])
  if kind == 'pooler':
    alphas = alphas.transpose(0, 2, 1)
  err = np.abs(alphas - np.stack(alphas_t)).max() / np.abs(np.stack(alphas_t)).max()
  assert err < 1e-5, err
  assert np.abs(alphas_t[-1] - alphas_t[0]).max() > 1e-3


# ---- a model in the original's setting -----------------------------------------------------------
VOCAB, SEQ, BATCH = 16, 8, 8     # tables and Dense kernels of equal shapes share compilations


@pytest.fixture(scope='module')
def bert():
  cfg = models.from_config(dict(model_type='bert', vocab_size=VOCAB, hidden_size=16,
                                num_layers=1, num_heads=2, intermediate_size=16,
                                max_position_embeddings=16, hidden_dropout=0.0,
                                attention_dropout=0.0, head='cls', num_labels=2))
  model = models.build(cfg)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  params = traverse_util.flatten_dict(variables['params'])
  rng = np.random.default_rng(6)
  for k, v in params.items():    # LayerNorm gammas off the grid, as a trained model's
    if k[-1] == 'scale':
      params[k] = jnp.asarray(rng.normal(1.0, 0.2, v.shape), jnp.float32)
  variables = {'params': traverse_util.unflatten_dict(params)}
  batches = [{'input_ids': rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32),
              'attention_mask': np.ones((BATCH, SEQ), np.int32),
              'token_type_ids': rng.integers(0, 2, (BATCH, SEQ)).astype(np.int32)}
             for _ in range(3)]
  return model, variables, batches


def _run(bert, **over):
  model, variables, batches = bert
  q = quant.config(**dict(ar.PRESET, adaround_iters=60, adaround_lr=1e-2, adaround_samples=16,
                          est_num_batches=2, **over))
  return ar.adaround(model, variables, batches, q, False, with_report=True)


@pytest.fixture(scope='module')
def rounded(bert):
  return _run(bert)


def test_every_quantized_weight_is_rounded_in_forward_order(bert, rounded):
  model, variables, _ = bert
  qmodel, qvars, reports = rounded
  assert [r.point for r in reports] == ['Et', 'Ets', 'Ep', 'weln', 'wq0', 'wk0', 'wv0', 'wg0',
                                        'wx0', 'wf0', 'wh0', 'wz0', 'wP', 'wC']
  assert {r.kind for r in reports} == {'embed', 'ln', 'dense'}
  flat_p = traverse_util.flatten_dict(qvars['params'])
  flat_fp = traverse_util.flatten_dict(variables['params'])
  flat_q = traverse_util.flatten_dict(qvars['quant'])
  rules = qmodel.quant.rules
  for r in reports:
    path = tuple(r.path.split('/'))
    param = {'embed': 'embedding', 'ln': 'scale', 'dense': 'kernel'}[r.kind]
    w = np.asarray(flat_p[path + (param,)])
    x_min = flat_q[path + (r.point, 'x_min')]
    x_max = flat_q[path + (r.point, 'x_max')]
    axes = weight_reduce_axes(r.point, w, rules.per_channel)
    x_min = quantizers.expand_range(x_min, w.ndim, axes)
    x_max = quantizers.expand_range(x_max, w.ndim, axes)
    again = quantizers.quantize_dequantize(w, 4, True, x_min, x_max)
    np.testing.assert_array_equal(np.asarray(again), w)          # on the 4-bit grid
    s = np.asarray(quantizers.scale_zero_point(x_min, x_max, 4, True)[0])
    fp = np.asarray(flat_fp[path + (param,)])
    v = fp / s
    inside = (v >= -8) & (v <= 7)
    assert np.all(np.abs(w / s - v)[inside] <= 1 + 1e-4)         # floor or ceil of w / s
    assert not np.array_equal(w, fp), r.point                    # rounded, not left in FP
  assert any(r.flipped_fraction > 0.01 for r in reports)
  assert sum(r.mse_adaround for r in reports) < sum(r.mse_nearest for r in reports)


def test_layers_include_the_activation_function(bert):
  model, variables, batches = bert
  inputs = quant.calibrate.__globals__['model_inputs'](model, batches[0])
  layers = {l.point: l for l in ar.forward_layers(model, variables, inputs)}
  assert layers['wf0'].activation == 'gelu' and layers['wP'].activation == 'tanh'
  assert layers['wh0'].activation is None and layers['Et'].kind == 'embed'
  # the captured FFN1 output is GELU(x W + b) of the captured input
  cap = ar.Capture(model, list(layers.values()), variables, inputs)
  x, y = cap(variables, inputs, layers['wf0'])
  p = variables['params']['encoder_layer_0']['intermediate']
  np.testing.assert_allclose(np.asarray(y), np.asarray(
      jax.nn.gelu(x @ p['kernel'] + p['bias'], approximate=False)), rtol=1e-5, atol=1e-6)


def test_upstream_activations_are_floating_point(bert, rounded):
  """With 8-bit activations the rounding is the same as with FP activations (act_quant off
  while optimising); only the activation ranges are estimated afterwards."""
  _, qvars32, _ = rounded
  qmodel8, qvars8, _ = _run(bert, n_bits_act=8)
  for a, b in zip(jax.tree.leaves(qvars32['params']), jax.tree.leaves(qvars8['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rng = quant.calibrate.__globals__['quant_ranges'](qvars8)
  assert rng['f0'][1] > 0                                     # activation ranges estimated
  model, _, batches = bert
  out = qmodel8.apply(qvars8, batches[0]['input_ids'], attention_mask=batches[0]['attention_mask'])
  assert np.isfinite(np.asarray(out.logits)).all()


def test_defaults_are_the_originals():
  assert points.EXTRA_DEFAULTS['adaround_iters'] == 1000
  from configs import base
  q = base.quant_defaults()
  for k in ('adaround_iters', 'adaround_samples', 'adaround_lambda', 'adaround_warmup',
            'adaround_lr'):
    assert q[k] == points.EXTRA_DEFAULTS[k] == ar.PRESET[k], k
  assert ar.BATCH_SIZE == 8 and ar.PRESET['n_bits'] == 4 and ar.PRESET['ranges_weights'] == 'mse'
