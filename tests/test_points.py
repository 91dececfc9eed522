"""quant_setup / quant_dict resolution against hand-written expectations; config validation."""
import pytest

from oqt_jax import models, quant
from oqt_jax.errors import ConfigError
from oqt_jax.quant import points


def _bert(num_layers=3):
  return models.ModelConfig(model_type='bert', vocab_size=50, hidden_size=48, num_layers=num_layers,
                            num_heads=4, intermediate_size=96, max_position_embeddings=32)


def _opt(num_layers=2, pre_ln=True):
  return models.ModelConfig(model_type='opt', vocab_size=50, hidden_size=48, num_layers=num_layers,
                            num_heads=4, intermediate_size=96, max_position_embeddings=32,
                            activation='relu', do_layer_norm_before=pre_ln)


def _summary(rules, name):
  """'fp32' or e.g. '8 per_tensor', '16 groups6p(h0)'."""
  s = rules.spec(name)
  if not s.enabled:
    return 'fp32'
  out = f'{s.n_bits} {s.granularity}'
  if s.granularity == 'groups':
    out += f'{s.n_groups}' + (f'p({s.perm_source})' if s.permute else '')
  return out


def test_bert_setup_and_dict_resolution():
  qcfg = quant.config(
      quant_setup='fp32_head+int16_final_LN', per_channel=True,
      quant_dict="{'y': 16, 'h': 'ngp6', 'L1': 'fp32', 'h1': 8, 'Et': 2, 'x2': 'per_embd', "
                 "'wq': 4}")
  r = quant.rules(qcfg, _bert(3))
  expect = {
      # weights
      'Et': '2 per_channel', 'Ep': '8 per_channel', 'Ets': '8 per_channel',
      'wq0': '4 per_channel', 'wq1': 'fp32', 'wq2': '4 per_channel', 'wk0': '8 per_channel',
      'wh1': 'fp32', 'wx0': '8 per_channel', 'weln': '8 per_channel',
      'wC': 'fp32', 'wP': 'fp32', 'wMt': 'fp32', 'wMln': 'fp32', 'wM': 'fp32',
      # activations
      'ewt': '8 per_tensor', 'e': '8 per_tensor', 'eln': '8 per_tensor', 's0': '8 per_tensor', 'p2': '8 per_tensor',
      'y0': '16 per_tensor', 'y1': 'fp32', 'y2': '16 per_tensor',
      'h0': '8 groups6p(h0)', 'h1': '8 groups6p(h1)', 'h2': '8 groups6p(h2)',
      'x0': '8 per_tensor', 'x1': 'fp32', 'x2': '8 per_embd',
      'u1': 'fp32', 'q1': 'fp32', 'z0': '8 per_tensor', 'z1': 'fp32',
      'z2': '16 per_tensor',                                    # the final LN
      'P': 'fp32', 'C': 'fp32', 'Mt': 'fp32', 'Mln': 'fp32', 'M': 'fp32',
  }
  got = {n: _summary(r, n) for n in expect}
  assert got == expect
  assert r.spec('wq0').symmetric and not r.spec('h0').symmetric
  assert r.spec('h0').estimator == 'running_minmax'
  assert r.stats_points() == frozenset({'h0', 'h1', 'h2'})
  # An 'Et' key switches the word table to MSE golden-section ranges (the originals).
  assert (r.spec('Et').estimator, r.spec('Et').mse_search) == ('mse', 'golden')
  assert r.spec('Ep').estimator == 'current_minmax' and r.spec('Ep').mse_search is None
  assert quant.rules(quant.config(), _bert(1)).spec('Et').estimator == 'current_minmax'
  # The final LN at 16 bits: its output and its gamma.
  assert _summary(r, 'wz2') == '16 per_channel' and _summary(r, 'wz1') == 'fp32'
  assert _summary(r, 'wz0') == '8 per_channel'
  # 'e' drives both embedding-sum quantizers, as in the original.
  r = quant.rules(quant.config(quant_dict="{'e': 16}"), _bert(1))
  assert _summary(r, 'ewt') == '16 per_tensor' and _summary(r, 'e') == '16 per_tensor'
  r = quant.rules(quant.config(quant_dict="{'e': 16, 'ewt': 'fp32'}"), _bert(1))
  assert _summary(r, 'ewt') == 'fp32' and _summary(r, 'e') == '16 per_tensor'


def test_layer_key_and_specificity_order():
  # 'L' < letter < 'L<i>' < letter<i>, attribute by attribute.
  r = quant.rules(quant.config(quant_dict="{'L': 16, 'f': 4, 'L0': 'fp32', 'f0': 6}"), _bert(2))
  assert _summary(r, 'q1') == '16 per_tensor' and _summary(r, 'wq1') == '16 per_tensor'
  assert _summary(r, 'f1') == '4 per_tensor'
  assert _summary(r, 'q0') == 'fp32' and _summary(r, 'wf0') == 'fp32'
  assert _summary(r, 'f0') == '6 per_tensor'
  assert _summary(r, 'e') == '8 per_tensor' and _summary(r, 'M') == '8 per_tensor'


def test_opt_setups():
  r = quant.rules(quant.config(quant_setup='fp32_head+int16_all_LN'), _opt(2))
  for n in ('a0', 'x0', 'a1', 'x1', 'fln', 'wa0', 'wx0', 'wx1', 'wfln'):   # outputs and gammas
    assert _summary(r, n) == '16 per_tensor', n
  for n in ('y1', 'u0', 'e', 'pin', 'Et', 'wq0', 'wh1'):
    assert _summary(r, n) == '8 per_tensor', n
  assert _summary(r, 'M') == 'fp32' and _summary(r, 'wM') == 'fp32'

  r = quant.rules(quant.config(quant_setup='fp32_head+int16_final_LN'), _opt(2))
  assert _summary(r, 'fln') == '16 per_tensor' and _summary(r, 'x1') == '8 per_tensor'
  assert _summary(r, 'wfln') == '16 per_tensor' and _summary(r, 'wx1') == '8 per_tensor'
  r = quant.rules(quant.config(quant_setup='fp32_head+int16_final_LN'), _opt(2, pre_ln=False))
  assert _summary(r, 'x1') == '16 per_tensor'        # post-LN: the last layer's LN is final

  r = quant.rules(quant.config(quant_setup='FP_logits'), _opt(2))
  assert _summary(r, 'M') == 'fp32' and _summary(r, 'wM') == '8 per_tensor'
  r = quant.rules(quant.config(quant_setup='MSE_logits'), _opt(2))
  assert r.spec('M').estimator == 'mse' and r.spec('y0').estimator == 'running_minmax'
  assert r.spec('M').mse_search == 'golden'            # the original's MSE_logits search
  assert quant.rules(quant.config(quant_setup='CE_logits'), _bert(1)).spec('C').estimator == \
      'cross_entropy'


def test_global_granularity_and_shared_permutation():
  r = quant.rules(quant.config(act_granularity='ng4'), _bert(1))
  assert _summary(r, 'q0') == '8 groups4' and _summary(r, 'wq0') == '8 per_tensor'
  r = quant.rules(quant.config(quant_dict="{'x': 'ngp4', 'y': 'ngp4'}", permute_shared_h=True),
                  _bert(2))
  assert _summary(r, 'x1') == '8 groups4p(h1)' and _summary(r, 'y0') == '8 groups4p(h0)'
  assert _summary(r, 'h0') == '8 per_tensor'          # h is the source, not itself grouped
  assert r.stats_points() == frozenset({'h0', 'h1'})
  r = quant.rules(quant.config(quant_dict="{'x': 'ngp4'}"), _bert(1))
  assert _summary(r, 'x0') == '8 groups4p(x0)'


def test_parse_quant_dict_values():
  parsed = dict(((b, l), ov) for b, l, ov in
                points.parse_quant_dict("{'y11': 16, 'h': 'ngp6', 'L10': 'fp32', 'Et': 2, "
                                        "'x': 'ng3', 'z': 32}"))
  assert parsed[('y', 11)].bits == 16 and parsed[('y', 11)].enabled
  assert parsed[('h', None)].granularity == 'groups' and parsed[('h', None)].n_groups == 6
  assert parsed[('h', None)].permute
  assert parsed[('L', 10)].enabled is False
  assert parsed[('x', None)].permute is False and parsed[('z', None)].enabled is False
  assert points.parse_quant_dict({'wC': 4})[0][:2] == ('wC', None)
  assert points.parse_quant_dict('') == ()


@pytest.mark.parametrize('kw, field', [
    (dict(quant_dict="{'Q': 8}"), "quant.quant_dict: unknown point 'Q'"),
    (dict(quant_dict="{'e3': 8}"), "quant.quant_dict: point 'e3'"),
    (dict(quant_dict="{'h': 'ng0'}"), 'quant.quant_dict'),
    (dict(quant_dict="{'h': 1}"), 'quant.quant_dict'),
    (dict(quant_dict="{'wh': 'per_embd'}"), 'quant.quant_dict'),
    (dict(quant_dict="{'h': 8"), 'quant.quant_dict='),
    (dict(quant_setup='fp16_head'), "quant.quant_setup='fp16_head'"),
    (dict(n_bits=1), 'quant.n_bits=1'),
    (dict(n_bits_act=8.0), 'quant.n_bits_act=8.0'),
    (dict(qmethod='uniform'), 'quant.qmethod='),
    (dict(ranges_acts='minmax'), 'quant.ranges_acts='),
    (dict(ranges_weights='cross_entropy'), 'quant.ranges_weights='),
    (dict(ranges_acts='percentile'), 'quant.percentile=-1.0'),
    (dict(momentum=1.0), 'quant.momentum='),
    (dict(est_num_batches=0), 'quant.est_num_batches=0'),
    (dict(act_granularity='per_row'), 'quant.act_granularity='),
    (dict(mse_search='bisect'), 'quant.mse_search='),
    (dict(int8=True, n_bits=16), 'quant.int8=True'),
    (dict(int8=True, qmethod='asymmetric_uniform'), 'quant.int8=True'),
    (dict(bogus=1), 'quant.bogus: unknown field'),
])
def test_invalid_configs(kw, field):
  with pytest.raises(ConfigError) as e:
    quant.config(**kw)
  assert str(e.value).startswith(field), str(e.value)
  assert '\n' not in str(e.value)


def test_defaults_match_configs_base_and_full_config_validates():
  from configs import base
  q = base.quant_defaults()
  known = dict(points.QUANT_DEFAULTS, **points.EXTRA_DEFAULTS)
  assert {k: q[k] for k in q} == {k: known[k] for k in q}      # same defaults
  assert set(points.QUANT_DEFAULTS) <= set(q)
  cfg = base.get_config()
  quant.validate_quant_config(cfg)                   # a full config works too (no extras)
  cfg.quant.quant_dict = "{'y': 'ngp'}"
  with pytest.raises(ConfigError, match=r'^quant\.quant_dict'):
    quant.validate_quant_config(cfg)


def test_describe_lists_changed_points():
  r = quant.rules(quant.config(quant_dict="{'h0': 16, 'x': 'ngp4'}"), _bert(1))
  text = quant.describe(r)
  assert 'h0  16b per_tensor' in text and 'x0' in text and 'q0' not in text
