"""Real int8 matmuls (AQT) against the fake-quant path."""
import dataclasses

import jax
import numpy as np
import pytest

from oqt_jax import models, quant
from oqt_jax.quant import int8

SEQ, VOCAB = 16, 100


def _batches(n, seed):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = rng.integers(3, VOCAB, (4, SEQ)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1:, 12:] = 0
    out.append({'input_ids': ids, 'attention_mask': mask})
  return out


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope='module')
def setup():
  cfg = models.ModelConfig(model_type='bert', vocab_size=VOCAB, hidden_size=32, num_layers=2,
                           num_heads=4, intermediate_size=64, max_position_embeddings=32)
  model = models.build(cfg)
  variables = models.init_variables(model, jax.random.PRNGKey(0), seq_len=SEQ)
  cal = _batches(2, seed=1)
  qm8, qv8 = quant.calibrate(model, variables, cal,
                             quant.config(int8=True, per_channel=True, est_num_batches=2))
  qmf, qvf = quant.calibrate(model, variables, cal,
                             quant.config(per_channel=True, est_num_batches=2))
  test = _batches(1, seed=2)[0]
  run = lambda m, v: jax.jit(lambda v, b: m.apply(v, b['input_ids'],
                                                  attention_mask=b['attention_mask']))(v, test)
  return dict(model=model, variables=variables, qm8=qm8, qv8=qv8, qmf=qmf, qvf=qvf, test=test,
              run=run)


def test_int8_matches_its_float_twin_and_fake_quant(setup):
  s = setup
  fp = s['run'](s['model'], s['variables']).logits
  aqt = s['run'](s['qm8'], s['qv8']).logits
  twin = s['run'](s['qm8'].clone(quant=dataclasses.replace(s['qm8'].quant, int8_backend='fake')),
                  s['qv8']).logits
  fake = s['run'](s['qmf'], s['qvf']).logits
  # The AQT int8 path computes exactly the integer arithmetic of its float reference ...
  assert _rel(aqt, twin) < 1e-5
  # ... and agrees closely with the fake-quant W8A8 model (inputs re-gridded symmetric).
  e_fake, e_fp = _rel(aqt, fake), _rel(fake, fp)
  print(f'int8 vs fake-quant {e_fake:.4f}, fake-quant vs FP {e_fp:.4f}, int8 vs FP '
        f'{_rel(aqt, fp):.4f}')
  assert e_fake < 0.05 and _rel(aqt, fp) < 0.08


def test_int8_lowers_to_int8_dot_with_int32_accumulation(setup):
  s = setup
  text = str(jax.make_jaxpr(lambda v, b: s['qm8'].apply(
      v, b['input_ids'], attention_mask=b['attention_mask']))(s['qv8'], s['test']))
  dots = [l for l in text.splitlines() if 'dot_general[' in l]
  assert any(':i32[' in l for l in dots)                # int32 accumulators
  assert 'i8[' in text                                   # int8 operands
  # One static input range per int8 Dense (q,k,v,g,f,h per layer + the MLM transform).
  names = [k for k in quant.quant_ranges(s['qv8']) if k.startswith('in_')]
  assert len(names) == 2 * 6 + 1 and 'in_f0' in names and 'in_Mt' in names


def test_int8_applies_only_to_low_bit_weights(setup):
  r = quant.rules(quant.config(int8=True, quant_dict="{'wh0': 16, 'L1': 'fp32'}",
                               quant_setup='fp32_head'), setup['model'].cfg)
  hooks = quant.QuantHooks(r)
  assert int8.uses_int8(hooks, 'f0') and not int8.uses_int8(hooks, 'h0')
  assert not int8.uses_int8(hooks, 'q1') and not int8.uses_int8(hooks, 'Mt')


def test_int8_and_fake_quant_share_the_weight_grid():
  """Weight codes clipped at -128 by the fake quantizer stay -128 in the int8 matmul (AQT and
  its float twin), checked against a numpy restatement of the integer arithmetic."""
  import jax.numpy as jnp
  from oqt_jax.models.layers import Dense
  from oqt_jax.quant.hooks import QuantHooks

  cfg = models.ModelConfig(model_type='bert', hidden_size=16, num_heads=2)
  rules = quant.rules(quant.config(int8=True, per_channel=True, quant_dict="{'f0': 'fp32'}"),
                      cfg)
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(16, 8)).astype(np.float32)
  x = rng.normal(size=(3, 5, 16)).astype(np.float32)
  # Narrow weight ranges (half the absmax, skewed): many codes clip to -128 and to 127.
  absmax = np.abs(kernel).max(0)
  w_min, w_max = -0.5 * absmax, 0.45 * absmax
  qstate = {'wf0': {'x_min': jnp.asarray(w_min), 'x_max': jnp.asarray(w_max),
                    'n': jnp.ones((), jnp.int32)},
            'in_f0': {'x_min': jnp.float32(-2.5), 'x_max': jnp.float32(2.0),
                      'n': jnp.ones((), jnp.int32)}}
  variables = {'params': {'kernel': jnp.asarray(kernel), 'bias': jnp.zeros(8)},
               'quant': qstate}
  out = {}
  for backend in ('aqt', 'fake'):
    hooks = QuantHooks(rules, mode='frozen', int8_backend=backend)
    dense = Dense(8, point='f0', quant=hooks)
    out[backend] = np.asarray(dense.apply(variables, jnp.asarray(x)))

  s_w = np.maximum(np.maximum(-w_min, w_max) / 127.0, 1e-8).astype(np.float32)
  codes = np.clip(np.round(kernel / s_w), -128, 127)
  assert (codes == -128).any() and (codes == 127).any()
  s_x = np.float32(2.5 / 127.0)
  xi = np.clip(np.round(x / s_x), -127, 127)
  want = (xi.astype(np.float64) @ codes) * s_x * s_w
  np.testing.assert_allclose(out['fake'], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['aqt'], want, rtol=1e-5, atol=1e-5)
