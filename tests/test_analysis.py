"""The outlier-mechanism analysis (oqt_jax/evaluate/analysis.py) finds a planted no-op head.

The planted model (a tiny BERT, random weights, then edited):
  - the [SEP] token's word embedding is large in dimension D_STAR, so after the embedding
    LayerNorm [SEP] is the only token with a large value there and small values elsewhere;
  - layer 0, head H_STAR: constant queries, keys reading only D_STAR -> the head puts nearly
    all its mass on [SEP]; its value projection ignores D_STAR -> [SEP]'s value is small
    (the head attends to a token whose value is ~zero: a "do nothing" head);
  - layer 0's FFN has one unit that fires only at [SEP] and writes ~160 into D_STAR of the
    FFN output (the outlier, at the delimiter, in one dimension).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oqt_jax import models
from oqt_jax.evaluate import analysis

D_STAR, H_STAR, UNIT = 7, 2, 5
NAMES = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [f'w{i}' for i in range(5, 16)] + ['.']
SEP, DOT = 3, 16


def _planted():
  cfg = models.ModelConfig(vocab_size=len(NAMES), hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=64, max_position_embeddings=32, hidden_dropout=0.0,
                           attention_dropout=0.0, head='none')
  model = models.build(cfg)
  p = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32)))['params']
  p = jax.tree.map(np.array, p)
  p['word_embeddings']['embedding'][SEP, D_STAR] = 30.0
  att = p['encoder_layer_0']['attention']
  d = cfg.head_dim
  cols = slice(H_STAR * d, (H_STAR + 1) * d)
  att['query']['kernel'][:, cols] = 0.0
  att['query']['bias'][cols] = 1.0
  att['key']['kernel'][:, cols] = 0.0
  att['key']['kernel'][D_STAR, cols] = 3.0
  att['key']['bias'][cols] = 0.0
  att['value']['kernel'][D_STAR, cols] = 0.0
  # [SEP]'s LayerNorm output is ~constant off D_STAR: zero-sum value columns map it to ~0
  wv = att['value']['kernel'][:, cols]
  rest = [j for j in range(32) if j != D_STAR]
  wv[rest] -= wv[rest].mean(axis=0, keepdims=True)
  att['value']['kernel'][:, cols] = wv
  att['value']['bias'][cols] = 0.0
  ffn = p['encoder_layer_0']
  ffn['intermediate']['kernel'][:, UNIT] = 0.0
  ffn['intermediate']['kernel'][D_STAR, UNIT] = 10.0
  ffn['intermediate']['bias'][UNIT] = -40.0
  ffn['output']['kernel'][UNIT, :] = 0.0
  ffn['output']['kernel'][UNIT, D_STAR] = 10.0
  return model, {'params': p}


def _batches(n=2, b=8, t=16):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    ids = rng.integers(5, 16, size=(b, t))
    ids[:, 0] = 2                        # [CLS]
    ids[:, t // 2] = DOT                 # punctuation mid-sentence
    ids[:, -1] = SEP
    mask = np.ones((b, t), np.int32)
    mask[0, -3:] = 0                     # a padded row: [SEP] earlier
    ids[0, -4] = SEP
    out.append({'input_ids': ids.astype(np.int32), 'attention_mask': mask,
                'token_type_ids': np.zeros((b, t), np.int32)})
  return out


def test_is_delimiter():
  assert analysis.is_delimiter('[SEP]', ['[CLS]', '[SEP]'])
  assert analysis.is_delimiter('.') and analysis.is_delimiter('##,')
  assert analysis.is_delimiter('\u0120.')
  assert not analysis.is_delimiter('the') and not analysis.is_delimiter('[UNK]', ['[SEP]'])


def test_planted_no_op_head_token_and_dim_are_found(tmp_path):
  model, variables = _planted()
  data = analysis.collect(model, variables, _batches())
  res = analysis.analyze(data, lambda i: NAMES[i], ['[CLS]', '[SEP]'])
  lay0 = res['layers'][0]
  assert lay0['outlier_dims'][0]['dim'] == D_STAR
  assert lay0['max_inf_norm'] > 100
  assert lay0['outlier_tokens'][0]['token'] == '[SEP]'
  assert lay0['outlier_tokens'][0]['share'] > 0.9
  top = res['no_op_heads'][0]
  assert (top['layer'], top['head']) == (0, H_STAR)
  head = next(h for h in res['heads'] if (h['layer'], h['head']) == (0, H_STAR))
  assert head['mass_delimiter'] > 0.9
  assert head['value_norm_delimiter'] < 0.5 * head['value_norm_other']
  others = [h for h in res['heads'] if (h['layer'], h['head']) != (0, H_STAR)]
  assert max(h['no_op_score'] for h in others) < 0.5 * top['no_op_score']
  # layer 1's heads: mass on the tokens that carried layer 0's outlier ([SEP] positions)
  l1 = [h for h in res['heads'] if h['layer'] == 1]
  assert all(h['mass_outlier_tokens'] is not None for h in l1)
  # JSON + plot written
  tok = type('T', (), {'convert_ids_to_tokens': staticmethod(lambda i: NAMES[i]),
                       'cls_token': '[CLS]', 'sep_token': '[SEP]'})()
  res2 = analysis.analyze_model(model, variables, _batches(), tok, str(tmp_path))
  assert (tmp_path / 'analysis.json').exists() and (tmp_path / 'analysis.png').exists()
  assert (res2['no_op_heads'][0]['layer'], res2['no_op_heads'][0]['head']) == (0, H_STAR)
  assert any('L0H2' in line for line in analysis.summary_lines(res2))
