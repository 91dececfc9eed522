"""Outlier metrics and perplexity against a numpy restatement of their definitions."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oqt_jax import models
from oqt_jax.evaluate import outliers
from oqt_jax.train import losses


def np_inf_norm(x, mask):
  """Mean over sequences with a valid token of max |x| over (valid T, D)."""
  vals = [np.abs(x[b][mask[b].astype(bool)]).max() for b in range(x.shape[0]) if mask[b].any()]
  return float(np.mean(vals))


def np_kurtosis(x, mask):
  """Mean over sequences of mean((r - mu)^4) / (std^4 + 1e-6), r = the sequence's valid
  entries flattened (valid T x D, as the originals' x.view(B, -1)), population std."""
  vals = []
  for b in range(x.shape[0]):
    if mask[b].any():
      r = x[b][mask[b].astype(bool)].astype(np.float64).ravel()
      d = r - r.mean()
      vals.append(np.mean(d ** 4) / (np.std(r) ** 4 + 1e-6))
  return float(np.mean(vals))


def _known():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 8)).astype(np.float32)
  x[0, 1, 2] = 40.0                  # outlier in a valid token
  x[1, 4, 0] = -500.0                # outlier in a padded token: must not count
  x[2, 0, :] = 7.0                   # constant row: kurtosis 0 thanks to the 1e-6
  mask = np.ones((3, 5), bool)
  mask[1, 3:] = False
  return x, mask


def test_kurtosis_is_pearson():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 4, 20000)).astype(np.float32)
  k = np.asarray(outliers.kurtosis_per_row(jnp.asarray(x)))
  assert np.allclose(k, 3.0, atol=0.15)           # a normal has Pearson kurtosis 3
  row = np.array([[[1.0, -1.0, 1.0, -1.0]]], np.float32)
  assert np.allclose(outliers.kurtosis_per_row(jnp.asarray(row)), 1.0 / (1.0 + 1e-6))


def test_kurtosis_is_per_sequence_not_per_token():
  # One spike in a (T=64, D=8) sequence: a per-token kurtosis is bounded by D = 8, the
  # originals' per-sequence one (over T x D entries) is not. (Paper: BERT avg kurtosis 3076
  # with D = 768.)
  x = np.zeros((1, 64, 8), np.float32)
  x[0, :, :] = np.random.default_rng(0).normal(size=(64, 8)) * 0.01
  x[0, 3, 5] = 100.0
  mask = np.ones((1, 64), bool)
  k = float(outliers.kurtosis_per_sequence(jnp.asarray(x), jnp.asarray(mask))[0])
  assert k > 100.0 and k == pytest.approx(np_kurtosis(x, mask), rel=1e-4)
  assert float(jnp.max(outliers.kurtosis_per_row(jnp.asarray(x)))) <= 8.0
  sums = outliers.tensor_sums(x, mask, jnp.ones((1,)))
  assert float(sums['kurt_sum'] / sums['n_seq']) == pytest.approx(k, rel=1e-6)
  # Padding is left out of the sequence's statistics.
  x2 = np.concatenate([x, np.full((1, 4, 8), 1e3, np.float32)], 1)
  m2 = np.concatenate([mask, np.zeros((1, 4), bool)], 1)
  k2 = float(outliers.kurtosis_per_sequence(jnp.asarray(x2), jnp.asarray(m2))[0])
  assert k2 == pytest.approx(k, rel=1e-5)


def test_tensor_metrics_match_numpy():
  x, mask = _known()
  sums = jax.jit(outliers.tensor_sums)(x, mask, jnp.ones((3,)))
  inf = float(sums['inf_sum'] / sums['n_seq'])
  kurt = float(sums['kurt_sum'] / sums['n_seq'])
  assert inf == pytest.approx(np_inf_norm(x, mask), rel=1e-6)
  assert kurt == pytest.approx(np_kurtosis(x, mask), rel=1e-5)
  assert inf == pytest.approx((40.0 + np.abs(x[1, :3]).max() + 7.0) / 3, rel=1e-6)
  # A sequence weight of 0 (eval filler row) removes the sequence entirely.
  sums0 = jax.jit(outliers.tensor_sums)(x, mask, jnp.asarray([1.0, 0.0, 1.0]))
  keep = mask.copy()
  keep[1] = False
  assert float(sums0['inf_sum'] / sums0['n_seq']) == pytest.approx(np_inf_norm(x, keep), rel=1e-6)
  assert float(sums0['n_seq']) == 2
  assert float(sums0['kurt_sum'] / sums0['n_seq']) == pytest.approx(np_kurtosis(x, keep),
                                                                      rel=1e-5)


def test_finalize_per_layer_and_summary():
  x, mask = _known()
  w = jnp.ones((3,))
  rng = np.random.default_rng(2)
  acc = None
  tensors = {}
  for i in range(2):
    for t in outliers.TENSORS['opt']:
      tensors[f'L{i}/{t}'] = (x * (1 + i) + rng.normal(size=x.shape)).astype(np.float32)
  tensors['final_ln_output'] = x
  for _ in range(2):   # two identical batches: means unchanged
    sums = {k: outliers.tensor_sums(v, mask, w) for k, v in tensors.items()}
    acc = outliers.accumulate(acc, sums)
  m = outliers.finalize(acc, 'opt', 2)
  assert [r['layer'] for r in m['per_layer']] == [0, 1]
  for i in range(2):
    for t in outliers.TENSORS['opt']:
      v = tensors[f'L{i}/{t}']
      assert m['per_layer'][i][t]['inf_norm'] == pytest.approx(np_inf_norm(v, mask), rel=1e-5)
      assert m['per_layer'][i][t]['kurtosis'] == pytest.approx(np_kurtosis(v, mask), rel=1e-4)
  assert m['max_inf_norm'] == pytest.approx(
      max(np_inf_norm(tensors[f'L{i}/layer_output'], mask) for i in range(2)), rel=1e-5)
  all_k = [np_kurtosis(v, mask) for v in tensors.values()]
  assert m['avg_kurtosis'] == pytest.approx(np.mean(all_k), rel=1e-4)
  assert m['max_kurtosis'] == pytest.approx(max(all_k), rel=1e-4)
  assert m['global']['final_ln_output']['inf_norm'] == pytest.approx(np_inf_norm(x, mask), rel=1e-6)
  assert m['perplexity'] is None


def test_bert_kurtosis_only_of_ffn_output_and_ln_output():
  # validate_mlm.py: kurtosis of the FFN output and the LN output; the residual sum (LN
  # input) reports its inf norm only and stays out of avg / max kurtosis.
  x, mask = _known()
  w = jnp.ones((3,))
  tensors = {'L0/ffn_output': x, 'L0/ffn_residual': x * 0 + np.arange(8, dtype=np.float32),
             'L0/ffn_ln_output': 2 * x + 1}
  tensors['L0/ffn_residual'][0, 0, 0] = 1e4       # a huge kurtosis that must not count
  sums = {k: outliers.tensor_sums(v, mask, w, kurtosis=not k.endswith('ffn_residual'))
          for k, v in tensors.items()}
  m = outliers.finalize(sums, 'bert', 1)
  assert 'kurtosis' not in m['per_layer'][0]['ffn_residual']
  assert m['per_layer'][0]['ffn_residual']['inf_norm'] == pytest.approx(
      np_inf_norm(tensors['L0/ffn_residual'], mask), rel=1e-6)
  ks = [np_kurtosis(tensors[k], mask) for k in ('L0/ffn_output', 'L0/ffn_ln_output')]
  assert m['avg_kurtosis'] == pytest.approx(np.mean(ks), rel=1e-4)
  assert m['max_kurtosis'] == pytest.approx(max(ks), rel=1e-4)
  assert outliers.KURTOSIS_TENSORS['bert'] == ('ffn_output', 'ffn_ln_output')


def test_eval_loss_sums_mlm_and_clm():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
  labels = rng.integers(0, 11, (2, 6)).astype(np.int32)
  labels[0, :3] = -100
  mask = np.ones((2, 6), np.int32)
  mask[1, 5] = 0
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))

  def np_ce(lp, lab, valid):
    return [-lp[b, t, lab[b, t]] for b in range(lab.shape[0]) for t in range(lab.shape[1])
            if valid[b, t]]

  batch = {'labels': labels, 'attention_mask': mask}
  ce, n = losses.loss_for_head('mlm', logits, batch)
  ref = np_ce(logp, labels, (labels != -100) & (mask == 1))
  assert float(n) == len(ref) and float(ce) == pytest.approx(sum(ref), rel=1e-5)
  ce, n = losses.loss_for_head('clm', logits, batch)
  ref = np_ce(logp[:, :-1], labels[:, 1:], (labels[:, 1:] != -100) & (mask[:, 1:] == 1))
  assert float(n) == len(ref) and float(ce) == pytest.approx(sum(ref), rel=1e-5)


def test_evaluate_end_to_end_matches_direct_computation():
  cfg = models.ModelConfig(model_type='bert', vocab_size=60, hidden_size=32, num_layers=2,
                           num_heads=4, intermediate_size=64, max_position_embeddings=16)
  model = models.build(cfg)
  variables = models.init_variables(model, jax.random.PRNGKey(0), seq_len=8)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(3):
    ids = rng.integers(3, 60, (4, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[2:, 6:] = 0
    labels = np.where(rng.random(ids.shape) < 0.3, ids, -100).astype(np.int32)
    labels[:, 1] = ids[:, 1]            # every row has a label (all -100 = filler row)
    labels[mask == 0] = -100
    batches.append({'input_ids': ids, 'attention_mask': mask, 'labels': labels,
                    'token_type_ids': np.zeros_like(ids)})
  batches[-1] = {k: v[:3] for k, v in batches[-1].items()}     # short last batch: padded
  m = outliers.evaluate(model, variables, batches)
  # Direct: one forward over everything, numpy statistics.
  cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  out, st = model.apply(variables, cat['input_ids'], attention_mask=cat['attention_mask'],
                        mutable=['intermediates'])
  inter = st['intermediates']
  valid = cat['attention_mask'].astype(bool)
  for i in range(2):
    h = np.asarray(inter[f'encoder_layer_{i}']['ffn_output'][0])
    got = m['per_layer'][i]['ffn_output']['inf_norm']
    assert got == pytest.approx(np_inf_norm(h, valid), rel=1e-4)
    z = np.asarray(inter[f'encoder_layer_{i}']['ffn_ln_output'][0])
    got = m['per_layer'][i]['ffn_ln_output']['kurtosis']
    assert got == pytest.approx(np_kurtosis(z, valid), rel=1e-3)
  logits = np.asarray(out.logits, np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  sel = cat['labels'] != -100
  nll = -np.take_along_axis(logp, np.where(sel, cat['labels'], 0)[..., None], -1)[..., 0][sel]
  assert m['perplexity'] == pytest.approx(math.exp(nll.mean()), rel=1e-4)
  assert m['num_tokens'] == int(sel.sum())
  assert set(m) >= {'perplexity', 'max_inf_norm', 'avg_kurtosis', 'max_kurtosis', 'per_layer'}
  assert 'kurtosis' not in m['per_layer'][0]['ffn_residual']     # end to end, too
  table = outliers.format_table(m, 'bert')
  assert table.count('\n') == 2 and 'ffn inf' in table
