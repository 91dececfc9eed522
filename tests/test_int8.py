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
