"""quant_setup / quant_dict resolution against hand-written expectations; config validation."""
import numpy as np
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


# ---- the selecting setups ------------------------------------------------------------------
def _enabled(rules):
  return {s.name for s in rules.table() if s.enabled}


def _layers(bases, n):
  return {f'{b}{i}' for b in bases for i in range(n)}


LINEAR_W = ('wq', 'wk', 'wv', 'wg', 'wf', 'wh')


@pytest.mark.parametrize('cfg, setup, want', [
    # SmoothQuant: every Dense weight inside the layers and the activation feeding it.
    (_bert(3), 'linear_inputs',
     {'eln', 'z0', 'z1'} | _layers('cxf', 3) | _layers(LINEAR_W, 3)),
    (_opt(2), 'linear_inputs', _layers('acxf', 2) | _layers(LINEAR_W, 2)),
    (_opt(2, pre_ln=False), 'linear_inputs',
     {'e', 'x0'} | _layers('acf', 2) | _layers(LINEAR_W, 2)),
    # Outlier Suppression: the matmul inputs, every Linear weight and the embedding tables.
    (_bert(3), 'matmul_inputs',
     {'eln', 'P', 'Mln', 'Et', 'Ep', 'Ets', 'wP', 'wC', 'wMt', 'wM'}
     | _layers('qkvpcxfz', 3) | _layers(LINEAR_W, 3)),
    (_opt(2), 'matmul_inputs',
     {'fln', 'Et', 'Ep', 'wM'} | _layers('aqkvpcxf', 2) | _layers(LINEAR_W, 2)),
    (_opt(2, pre_ln=False), 'matmul_inputs',
     {'e', 'Et', 'Ep', 'wM'} | _layers('aqkvpcxf', 2) | _layers(LINEAR_W, 2)),
])
def test_selecting_setups_enable_exactly_their_points(cfg, setup, want):
  r = quant.rules(quant.config(quant_setup=setup), cfg)
  assert _enabled(r) == want
  text = quant.describe(r)
  assert text.startswith(f'quant_setup={setup}: quantized ') and 'every other point fp32' in text


def test_selecting_setup_with_projection_and_overrides():
  cfg = _opt(2).replace(word_embed_proj_dim=32)
  r = quant.rules(quant.config(quant_setup='matmul_inputs'), cfg)
  assert {'pout', 'wpin', 'wpout'} <= _enabled(r) and 'pin' not in _enabled(r)
  r = quant.rules(quant.config(quant_setup='linear_inputs'), cfg)
  assert not {'pin', 'pout', 'wpin', 'wpout'} & _enabled(r)
  # quant_dict on top: SmoothQuant's quantize_bmm_input (Q, K, V outputs), a point off.
  r = quant.rules(quant.config(quant_setup='linear_inputs', act_granularity='per_token',
                               quant_dict="{'q': 8, 'k': 8, 'v': 8, 'f1': 'fp32'}"), cfg)
  assert _enabled(r) == (_layers('acxfqkv', 2) - {'f1'}) | _layers(LINEAR_W, 2)
  assert _summary(r, 'q0') == '8 per_token' and r.spec('q0').estimator == 'current_minmax'


def test_per_token_and_signed_fields():
  r = quant.rules(quant.config(act_granularity='per_token', quant_dict="{'h': 'per_tensor'}",
                               symmetric_signed=True), _bert(1))
  assert _summary(r, 'x0') == '8 per_token' and _summary(r, 'h0') == '8 per_tensor'
  assert r.spec('x0').signed and r.spec('wq0').signed and r.spec('wq0').x_neg is True
  assert r.spec('x0').x_neg is None              # asymmetric activations: no grid sign
  assert points.parse_quant_dict({'f': 'per_token'})[0][2].granularity == 'per_token'
  assert quant.rules(quant.config(), _bert(1)).spec('wq0').x_neg is None
  for kw, field in ((dict(symmetric_signed=1), 'quant.symmetric_signed=1'),
                    (dict(quant_setup='linear'), "quant.quant_setup='linear'"),
                    (dict(act_granularity='per_row'), 'quant.act_granularity=')):
    with pytest.raises(ConfigError, match='^' + field.replace('.', r'\.').replace('(', r'\(')):
      quant.config(**kw)


# ---- per-token activations against a numpy restatement ---------------------------------------
def _np_per_token(x, n_bits, symmetric, signed=None, row_mask=None):
  """Each row of the last axis quantized on its own range (float32 numpy)."""
  x = np.asarray(x, np.float32)
  valid = np.ones(x.shape, bool) if row_mask is None else row_mask
  lo = np.where(valid, x, np.inf).min(-1, keepdims=True)
  hi = np.where(valid, x, -np.inf).max(-1, keepdims=True)
  if row_mask is not None:
    none = ~row_mask.any(-1, keepdims=True)
    lo = np.where(none, x.min(-1, keepdims=True), lo)
    hi = np.where(none, x.max(-1, keepdims=True), hi)
  lo, hi = np.minimum(lo, 0).astype(np.float32), np.maximum(hi, 1e-8).astype(np.float32)
  if symmetric:
    signed = bool((lo < 0).any()) if signed is None else signed
    q_min, q_max = (-2.0 ** (n_bits - 1), 2.0 ** (n_bits - 1) - 1) if signed else \
        (0.0, 2.0 ** n_bits - 1)
    s = (np.maximum(-lo, hi) / np.float32(q_max)).astype(np.float32)
    return (s * np.clip(np.round(x / s), q_min, q_max)).astype(np.float32)
  q_max = 2.0 ** n_bits - 1
  s = ((hi - lo) / np.float32(q_max)).astype(np.float32)
  z = np.clip(np.round(-lo / s), 0, q_max)
  return (s * (np.clip(np.round(x / s) + z, 0, q_max) - z)).astype(np.float32)


def _run_point(qcfg, name, x, mask, mode='frozen'):
  import flax.linen as nn
  import jax

  class Point(nn.Module):
    hooks: object

    @nn.compact
    def __call__(self, x, mask):
      return self.hooks.act(self, name, x, mask)

  hooks = quant.hooks(qcfg, _opt(2), mode=mode)
  out, state = Point(hooks).apply({}, x, mask, mutable=['quant'])
  return np.asarray(out), jax.tree_util.tree_leaves(state)


@pytest.mark.parametrize('qmethod_acts, signed, n_bits', [
    ('symmetric_uniform', False, 8), ('symmetric_uniform', True, 8),
    ('asymmetric_uniform', False, 8), ('symmetric_uniform', True, 4)])
def test_per_token_quantizer_against_numpy(qmethod_acts, signed, n_bits):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((3, 5, 16)) * rng.uniform(0.01, 20, (3, 5, 1))).astype(np.float32)
  x[1, 2] = np.abs(x[1, 2])                # a non-negative row within a signed tensor
  relu = np.maximum(x, 0)                  # a non-negative tensor (ReLU output)
  mask = np.ones((3, 5), bool)
  mask[2, 3:] = False                      # padding: a row is its own token, nothing changes
  qcfg = quant.config(act_granularity='per_token', qmethod_acts=qmethod_acts, n_bits_act=n_bits,
                      symmetric_signed=signed)
  sym = qmethod_acts == 'symmetric_uniform'
  for t in (x, relu):
    for mode in ('frozen', 'calibrating', 'dynamic'):
      got, state = _run_point(qcfg, 'f0', t, mask, mode)
      assert not state                       # nothing stored per token
      want = _np_per_token(t, n_bits, sym, True if signed else None)
      np.testing.assert_array_equal(got, want)
  if sym and not signed:   # ReLU output on the unsigned grid: absmax / 255, not / 127
    got, _ = _run_point(qcfg, 'f0', relu, mask)
    np.testing.assert_array_equal(got, _np_per_token(relu, n_bits, True, False))
    assert not np.array_equal(got, _np_per_token(relu, n_bits, True, True))

  # (B, H, T, T) scores: one range per (batch, head, query) row over the valid keys.
  s = rng.standard_normal((3, 2, 5, 5)).astype(np.float32) * 4
  s[2, :, :, 3:] = 50.0                    # padding keys' scores: left out of the rows' ranges
  keys = np.broadcast_to(mask[:, None, None, :] & mask[:, None, :, None], s.shape)
  got, _ = _run_point(qcfg, 's0', s, mask)
  np.testing.assert_array_equal(got, _np_per_token(s, n_bits, sym, True if signed else None,
                                                   row_mask=keys))
  got_unmasked, _ = _run_point(qcfg, 's0', s, None)
  assert not np.array_equal(got[2, :, :, :3], got_unmasked[2, :, :, :3])
