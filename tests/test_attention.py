"""Clipped softmax and every gate type against plain NumPy restatements of the formulas."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oqt_jax.errors import ConfigError
from oqt_jax.models import ModelConfig, parse_softmax
from oqt_jax.models.attention import AttentionGate, MultiHeadAttention, clipped_softmax


def np_clipped_softmax(x, gamma, zeta):
  e = np.exp(x - x.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  return np.clip((zeta - gamma) * p + gamma, 0, 1)


def np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize('spec,expect', [('vanilla', (0.0, 1.0)), ('clipped(-.025:1)', (-0.025, 1.0)),
                                         ('clipped(-0.1:1.1)', (-0.1, 1.1)),
                                         ('clipped( -1e-2 : 1 )', (-0.01, 1.0))])
def test_parse_softmax(spec, expect):
  assert parse_softmax(spec) == pytest.approx(expect)


@pytest.mark.parametrize('spec,msg', [('clipped(0.1:1)', 'gamma must be <= 0'),
                                      ('clipped(-.1:0.9)', 'zeta must be >= 1'),
                                      ('softmax2', "expected 'vanilla'")])
def test_bad_softmax_names_field(spec, msg):
  with pytest.raises(ConfigError, match=rf'^model\.softmax=.*{msg}'):
    parse_softmax(spec)


def test_alpha_form_uses_fixed_T():
  cfg = ModelConfig(model_type='opt', alpha=12, softmax_T=512).validate()
  assert cfg.clip_gamma_zeta == pytest.approx((-12 / 512, 1.0))


@pytest.mark.parametrize('gamma,zeta', [(0.0, 1.0), (-0.025, 1.0), (-0.1, 1.1), (-0.3, 1.0)])
def test_clipped_softmax_matches_numpy_and_has_exact_zeros(gamma, zeta):
  x = np.random.default_rng(0).normal(size=(4, 3, 16)).astype(np.float32) * 3
  got = np.asarray(clipped_softmax(jnp.asarray(x), gamma, zeta))
  np.testing.assert_allclose(got, np_clipped_softmax(x, gamma, zeta), atol=1e-6, rtol=1e-5)
  if gamma < 0:
    assert (got == 0.0).sum() > 0          # exact zeros: a head can attend to nothing
  if zeta > 1:
    x_peaked = np.zeros((1, 8), np.float32)
    x_peaked[0, 0] = 30.0
    assert float(clipped_softmax(jnp.asarray(x_peaked), gamma, zeta)[0, 0]) == 1.0


def test_clip01_value_and_derivative_equal_jnp_clip():
  """clip01 (one select for the derivative) equals jnp.clip(z, 0, 1) in value and gradient,
  the bounds' 1/2 included; so does the clipped softmax of a saturated row (z = 1 exactly)."""
  from oqt_jax.models.attention import clip01
  z = jnp.asarray([-1.0, 0.0, 0.3, 1.0, 2.0])
  ref = lambda v: jnp.clip(v, 0.0, 1.0)
  np.testing.assert_array_equal(np.asarray(clip01(z)), np.asarray(ref(z)))
  for f in (clip01, ref):
    assert [float(jax.grad(f)(v)) for v in z] == [0.0, 0.5, 1.0, 0.5, 0.0]
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 8)).astype(np.float32) * 3)
  x = x.at[0, 0].set(200.0)                      # softmax row 0 saturates: p = 1, z = 1
  w = jnp.asarray(np.random.default_rng(3).normal(size=(3, 8)).astype(np.float32))
  ref_sm = lambda v: jnp.clip(1.025 * jax.nn.softmax(v) - 0.025, 0.0, 1.0)
  g = jax.grad(lambda v: jnp.sum(clipped_softmax(v, -0.025, 1.0) * w))(x)
  g_ref = jax.grad(lambda v: jnp.sum(ref_sm(v) * w))(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-6, atol=1e-7)


def test_clipped_softmax_gradient_zero_where_clipped():
  gamma, zeta = -0.2, 1.0
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16,)).astype(np.float32) * 2)
  p = clipped_softmax(x, gamma, zeta)
  clipped = np.asarray(p) == 0.0
  assert clipped.any() and (~clipped).any()
  for j in range(16):
    g = jax.grad(lambda v: clipped_softmax(v, gamma, zeta)[j])(x)
    if clipped[j]:
      np.testing.assert_array_equal(np.asarray(g), 0.0)   # no pressure on clipped outputs
    else:
      assert np.abs(np.asarray(g)).max() > 0
      # in the linear region d/dx equals (zeta-gamma) * softmax jacobian row
      s = np.asarray(jax.nn.softmax(x))
      jac = (zeta - gamma) * (s[j] * ((np.arange(16) == j) - s))
      np.testing.assert_allclose(np.asarray(g), jac, atol=1e-6)


def _gate_cfg(**kw):
  base = dict(model_type='bert', hidden_size=16, num_heads=4, intermediate_size=32,
              num_layers=1, vocab_size=10, max_position_embeddings=8)
  base.update(kw)
  return ModelConfig(**base).validate()


X = np.random.default_rng(2).normal(size=(2, 5, 16)).astype(np.float32)


def _gate(cfg):
  mod = AttentionGate(cfg)
  params = jax.tree_util.tree_map(  # perturb so biases / weights are not at their init values
      lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(3), p.shape),
      nn.meta.unbox(mod.init(jax.random.PRNGKey(0), jnp.asarray(X))['params']))
  pi = np.asarray(mod.apply({'params': params}, jnp.asarray(X)))
  return pi, jax.tree_util.tree_map(np.asarray, params)


def test_unconditional_per_head():
  pi, p = _gate(_gate_cfg(gate='unconditional_per_head'))
  assert pi.shape == (1, 4, 1, 1)
  np.testing.assert_allclose(pi[0, :, 0, 0], np_sigmoid(p['alpha']), rtol=1e-6)


@pytest.mark.parametrize('gate', ['conditional_per_token', 'conditional_per_head'])
def test_conditional_linear_gate(gate):
  pi, p = _gate(_gate_cfg(gate=gate))
  xh = X.reshape(2, 5, 4, 4)                       # head h sees only its own d_head slice
  logits = np.stack([xh[:, :, h] @ p['kernel'][h] + p['bias'][h] for h in range(4)], 1)  # (B,H,T)
  if gate == 'conditional_per_head':
    want = np_sigmoid(logits.mean(2, keepdims=True))[..., None]
    assert pi.shape == (2, 4, 1, 1)
  else:
    want = np_sigmoid(logits)[..., None]
    assert pi.shape == (2, 4, 5, 1)
  np.testing.assert_allclose(pi, want, rtol=1e-5, atol=1e-6)


def test_gate_mlp():
  pi, p = _gate(_gate_cfg(gate='conditional_per_token', gate_mlp=True))
  xh = X.reshape(2, 5, 4, 4)
  want = []
  for h in range(4):
    hid = np.maximum(xh[:, :, h] @ p['kernel1'][h] + p['bias1'][h], 0)
    want.append(np_sigmoid(hid @ p['kernel2'][h] + p['bias2'][h]))
  np.testing.assert_allclose(pi, np.stack(want, 1)[..., None], rtol=1e-5, atol=1e-6)


def test_gate_linear_all_features():
  pi, p = _gate(_gate_cfg(gate='conditional_per_token', gate_linear_all_features=True))
  want = np_sigmoid(X @ p['kernel'] + p['bias']).transpose(0, 2, 1)[..., None]
  np.testing.assert_allclose(pi, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kw', [dict(), dict(gate_mlp=True)])
def test_gate_init_bias_is_logit_p(kw):
  cfg = _gate_cfg(gate='conditional_per_token', gate_init=0.25, **kw)
  params = nn.meta.unbox(
      AttentionGate(cfg).init(jax.random.PRNGKey(0), jnp.asarray(X))['params'])
  b = params['bias2' if kw else 'bias']
  np.testing.assert_allclose(np.asarray(b), -np.log(1 / 0.25 - 1), rtol=1e-6)
  assert np.log(1 / 0.25 - 1) == pytest.approx(1.0986, abs=1e-4)


def test_fine_tuning_scaling_and_small_init():
  cfg = _gate_cfg(gate='conditional_per_token', gate_init=0.25, fine_tuning=True)
  mod = AttentionGate(cfg)
  params = nn.meta.unbox(mod.init(jax.random.PRNGKey(0), jnp.asarray(X)))
  assert float(np.std(np.asarray(params['params']['kernel']))) < 0.02
  pi = np.asarray(mod.apply(params, jnp.asarray(X)))
  np.testing.assert_allclose(pi, 1.0, atol=0.1)       # ~ 1: the pretrained function is preserved


def test_gate_multiplies_context_before_output_projection():
  """Attention with a gate equals the ungated per-head context times pi, then out-projection."""
  cfg = _gate_cfg(gate='conditional_per_token', hidden_dropout=0.0, attention_dropout=0.0)
  mha = MultiHeadAttention(cfg, layer=0)
  x = jnp.asarray(X)
  mask = jnp.ones((2, 1, 5, 5), bool)
  v = nn.meta.unbox(mha.init(jax.random.PRNGKey(0), x, x, mask))
  p = jax.tree_util.tree_map(np.asarray, v['params'])
  out = np.asarray(mha.apply(v, x, x, mask))
  lin = lambda n, t: t @ p[n]['kernel'] + p[n]['bias']
  q, k, val = (lin(n, X).reshape(2, 5, 4, 4).transpose(0, 2, 1, 3) for n in ('query', 'key', 'value'))
  s = q @ k.transpose(0, 1, 3, 2) / 2.0
  ctx = np_clipped_softmax(s, 0.0, 1.0) @ val
  xh = X.reshape(2, 5, 4, 4)
  pi = np_sigmoid(np.stack([xh[:, :, h] @ p['gate']['kernel'][h] + p['gate']['bias'][h]
                            for h in range(4)], 1))[..., None]
  want = lin('out', (ctx * pi).transpose(0, 2, 1, 3).reshape(2, 5, 16))
  np.testing.assert_allclose(out, want, atol=1e-5)


@pytest.mark.parametrize('kw,field', [(dict(num_heads=5), 'num_heads'), (dict(gate='per_head'), 'gate'),
                                      (dict(gate_init=1.0), 'gate_init'),
                                      (dict(activation='swish'), 'activation'),
                                      (dict(gate='none', gate_mlp=True), 'gate')])
def test_invalid_model_config_names_field(kw, field):
  with pytest.raises(ConfigError, match=rf'^model\.{field}='):
    _gate_cfg(**kw)
