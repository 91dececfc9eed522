"""Attention variants beyond the paper (softmax1, learned sink, elementwise gate), the MLP2 gate
and the torch_default init, against NumPy / PyTorch restatements."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from oqt_jax.errors import ConfigError
from oqt_jax.models import ModelConfig
from oqt_jax.models.attention import AttentionGate, MultiHeadAttention, sink_softmax

B, T, D, H = 2, 5, 16, 4
X = np.random.default_rng(2).normal(size=(B, T, D)).astype(np.float32)


def np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def np_sink_softmax(x, s):
  """exp(x_i) / (exp(s) + sum_j exp(x_j)) in float64 (no stabilisation needed at these sizes)."""
  x = x.astype(np.float64)
  e = np.exp(x)
  return e / (np.exp(s) + e.sum(-1, keepdims=True))


def _cfg(**kw):
  base = dict(model_type='opt', hidden_size=D, num_heads=H, intermediate_size=32, num_layers=1,
              vocab_size=10, max_position_embeddings=8, hidden_dropout=0.0,
              attention_dropout=0.0, layer_norm_eps=1e-5)
  base.update(kw)
  return ModelConfig(**base).validate()


def test_sink_softmax_matches_numpy_and_is_stable():
  x = np.random.default_rng(0).normal(size=(3, 4, 6)) * 3
  for s in (0.0, -1.5, 2.0):
    np.testing.assert_allclose(np.asarray(sink_softmax(jnp.asarray(x), s)),
                               np_sink_softmax(x, s), rtol=1e-5, atol=1e-7)
  # Huge logits: the stable form neither overflows nor loses the denominator's sink term.
  big = np.array([[1000.0, 999.0, -5.0]])
  got = np.asarray(sink_softmax(jnp.asarray(big, jnp.float32), 0.0))
  want = np.exp(big - 1000) / (np.exp(-1000.0) + np.exp(big - 1000).sum())
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Very negative logits (a head that does nothing): total mass ~ 0, unlike softmax.
  low = np.full((1, 4), -30.0)
  assert float(np.asarray(sink_softmax(jnp.asarray(low, jnp.float32), 0.0)).sum()) < 1e-11
  # Masked entries (the model's finfo.min) get exactly zero.
  m = np.array([[0.5, np.finfo(np.float32).min, 1.0]], np.float32)
  assert np.asarray(sink_softmax(jnp.asarray(m), 0.0))[0, 1] == 0.0


def _mha(cfg, perturb=True):
  mha = MultiHeadAttention(cfg, layer=0)
  x = jnp.asarray(X)
  mask = jnp.tril(jnp.ones((T, T), bool))[None, None]
  v = {'params': nn.meta.unbox(mha.init(jax.random.PRNGKey(0), x, x, mask)['params'])}
  if perturb:   # biases / sink / gates away from their init values
    leaves, tdef = jax.tree_util.tree_flatten(v)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    v = jax.tree_util.tree_unflatten(
        tdef, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v['params'])
  out, col = mha.apply(v, x, x, mask, mutable=['attention'])
  return np.asarray(out), np.asarray(col['attention']['probs'][0]), p


def _np_attention(p, probs_fn, gate_fn=None):
  lin = lambda n, t: t @ p[n]['kernel'] + p[n]['bias']
  x = X.astype(np.float64)
  q, k, v = (lin(n, x).reshape(B, T, H, D // H).transpose(0, 2, 1, 3)
             for n in ('query', 'key', 'value'))
  s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D // H)
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  probs = probs_fn(s)
  ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
  if gate_fn is not None:
    ctx = ctx * gate_fn(x)
  return lin('out', ctx), probs


def test_softmax1_attention_matches_numpy():
  out, probs, p = _mha(_cfg(softmax='softmax1'))
  want, want_p = _np_attention(p, lambda s: np_sink_softmax(s, 0.0))
  np.testing.assert_allclose(probs, want_p, atol=1e-5)
  np.testing.assert_allclose(out, want, atol=1e-4)
  assert (probs.sum(-1) < 1).all()       # room for "nothing"


def test_sink_attention_matches_numpy_per_head_logit():
  out, probs, p = _mha(_cfg(softmax='sink'))
  s_h = p['sink'][None, :, None, None]
  assert p['sink'].shape == (H,)
  want, want_p = _np_attention(p, lambda s: np_sink_softmax(s, s_h))
  np.testing.assert_allclose(probs, want_p, atol=1e-5)
  np.testing.assert_allclose(out, want, atol=1e-4)


def test_sink_logit_gradient_matches_torch():
  x = np.random.default_rng(1).normal(size=(2, 3, 4, 4))
  s = np.array([0.3, -0.2, 1.0])
  w = np.random.default_rng(2).normal(size=x.shape)
  g = jax.grad(lambda sv: jnp.sum(sink_softmax(jnp.asarray(x, jnp.float32),
                                               sv[None, :, None, None]) * w))(
      jnp.asarray(s, jnp.float32))
  xt = torch.tensor(x)
  st = torch.tensor(s, requires_grad=True)
  e = torch.exp(xt)
  pt = e / (torch.exp(st)[None, :, None, None] + e.sum(-1, keepdim=True))
  (pt * torch.tensor(w)).sum().backward()
  np.testing.assert_allclose(np.asarray(g), st.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_elementwise_gate_matches_numpy():
  cfg = _cfg(gate='elementwise')
  out, _, p = _mha(cfg)
  g = p['gate']
  assert g['kernel'].shape == (D, D) and g['bias'].shape == (D,)
  want, _ = _np_attention(p, lambda s: np_sink_softmax(s, -np.inf),
                          gate_fn=lambda x: np_sigmoid(x @ g['kernel'] + g['bias']))
  np.testing.assert_allclose(out, want, atol=1e-4)


def test_gate_mlp2_matches_numpy():
  cfg = _cfg(gate='conditional_per_token', gate_mlp2=True)
  mod = AttentionGate(cfg)
  params = nn.meta.unbox(mod.init(jax.random.PRNGKey(0), jnp.asarray(X))['params'])
  d = D // H
  assert params['kernel1'].shape == (H, d, d) and params['kernel2'].shape == (H, d)
  params = jax.tree_util.tree_map(
      lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(3), a.shape), params)
  pi = np.asarray(mod.apply({'params': params}, jnp.asarray(X)))
  p = jax.tree_util.tree_map(np.asarray, params)
  xh = X.reshape(B, T, H, d)
  want = np.stack([np_sigmoid(np.maximum(xh[:, :, h] @ p['kernel1'][h] + p['bias1'][h], 0)
                              @ p['kernel2'][h] + p['bias2'][h]) for h in range(H)], 1)
  np.testing.assert_allclose(pi, want[..., None], rtol=1e-5, atol=1e-6)


# ---- torch_default init ------------------------------------------------------------------
def _std_ok(a, bound):
  """|std - bound/sqrt(3)| within 5 standard errors of the sample std of U(-b, b)."""
  a = np.asarray(a, np.float64).ravel()
  sigma = bound / math.sqrt(3)
  se = sigma * math.sqrt(0.8 / len(a))      # var of s^2 for U: (9/5 - 1) sigma^4 / n
  assert abs(a.std() - sigma) < 5 * se + 1e-12, (a.std(), sigma)
  assert np.abs(a).max() <= bound + 1e-7


@pytest.mark.parametrize('model_type', ['opt', 'bert'])
def test_torch_default_init_matches_pytorch_linear(model_type):
  d = 256
  cfg = ModelConfig(model_type=model_type, hidden_size=d, num_heads=8, intermediate_size=32,
                    num_layers=1, vocab_size=10, max_position_embeddings=8,
                    attention_init='torch_default', gate='conditional_per_token',
                    gate_init=0.25, init_std=0.006).validate()
  x = jnp.zeros((1, 2, d))
  v = nn.meta.unbox(MultiHeadAttention(cfg, layer=0).init(
      jax.random.PRNGKey(0), x, x, jnp.ones((1, 1, 2, 2), bool)))['params']
  lin = torch.nn.Linear(d, d)                 # the reference: PyTorch's own default init
  ref = lin.weight.detach().numpy()
  bound = 1 / math.sqrt(d)
  assert np.abs(ref).max() <= bound and abs(ref.std() - bound / math.sqrt(3)) < 0.02 * bound
  swapped = ('query', 'key', 'value', 'out') if model_type == 'opt' else ('query', 'key', 'value')
  for n in swapped:
    _std_ok(v[n]['kernel'], bound)
    _std_ok(v[n]['bias'], bound)
    # same distribution as torch's Linear weight (two-sample, a loose KS bound)
    from scipy.stats import ks_2samp
    assert ks_2samp(np.asarray(v[n]['kernel']).ravel(), ref.ravel()).pvalue > 1e-4
  if model_type == 'bert':   # BertSelfOutput.dense is not swapped: HF's normal init
    assert np.asarray(v['out']['kernel']).std() == pytest.approx(0.006, rel=0.05)
    assert not np.asarray(v['out']['bias']).any()
  g = v['gate']
  _std_ok(g['kernel'], 1 / math.sqrt(d // 8))      # one Linear(d_head, 1) per head
  np.testing.assert_allclose(np.asarray(g['bias']), -math.log(1 / 0.25 - 1), rtol=1e-6)


def test_normal_init_unchanged():
  cfg = _cfg(attention_init='normal', init_std=0.02, hidden_size=128, num_heads=4)
  x = jnp.zeros((1, 2, 128))
  v = nn.meta.unbox(MultiHeadAttention(cfg, layer=0).init(
      jax.random.PRNGKey(0), x, x, jnp.ones((1, 1, 2, 2), bool)))['params']
  assert np.asarray(v['query']['kernel']).std() == pytest.approx(0.02, rel=0.05)
  assert not np.asarray(v['query']['bias']).any()


@pytest.mark.parametrize('kw,field', [
    (dict(softmax='sink', alpha=12.0), 'alpha'),
    (dict(attention_init='xavier'), 'attention_init'),
    (dict(gate='conditional_per_token', gate_mlp=True, gate_mlp2=True), 'gate_mlp2'),
    (dict(gate='elementwise', gate_mlp2=True), 'gate'),
    (dict(softmax='softmax2'), 'softmax'),
])
def test_invalid_variant_names_field(kw, field):
  with pytest.raises(ConfigError, match=rf'^model\.{field}='):
    _cfg(**kw)


@pytest.mark.parametrize('kw', [dict(softmax='sink', gate='elementwise')])
def test_hf_roundtrip_keeps_new_parameters(tmp_path, kw):
  from oqt_jax import models
  from oqt_jax.models import hf
  cfg = _cfg(**kw)
  model = models.build(cfg)
  v = models.init_variables(model, jax.random.PRNGKey(0))
  v = jax.tree_util.tree_map(lambda a: a + 0.1, v)
  ids = jnp.asarray(np.random.default_rng(0).integers(2, 10, (2, 6)), jnp.int32)
  hf.save(model, v, str(tmp_path))
  keys = list(hf.read_state_dict(str(tmp_path)))
  for name in ('decoder.layers.0.self_attn.sink', 'decoder.layers.0.self_attn.gate.kernel'):
    assert any(k.endswith(name) for k in keys), keys
  model2, v2 = hf.load(str(tmp_path))
  assert model2.cfg.softmax == cfg.softmax and model2.cfg.gate == cfg.gate
  np.testing.assert_allclose(np.asarray(model2.apply(v2, ids).logits),
                             np.asarray(model.apply(v, ids).logits), atol=1e-5)
