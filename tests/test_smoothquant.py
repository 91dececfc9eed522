"""SmoothQuant: FP output unchanged (pre-LN OPT, post-LN BERT, after Gamma Migration), the
smoothing factors against a numpy restatement, and lower W8A8 error on planted LN outliers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oqt_jax import models, quant
from oqt_jax.quant.methods import migration
from oqt_jax.quant.methods import smoothquant as sq

SEQ, BATCH, VOCAB = 12, 4, 50


def _cfg(model_type, **kw):
  base = dict(model_type=model_type, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
              intermediate_size=64, max_position_embeddings=32,
              activation='gelu' if model_type == 'bert' else 'relu')
  base.update(kw)
  return models.ModelConfig(**base)


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = rng.integers(3, VOCAB, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[2, 7:] = 0
    ids[mask == 0] = 0
    out.append({'input_ids': ids, 'attention_mask': mask, 'token_type_ids': np.zeros_like(ids)})
  return out


_apply = jax.jit(lambda m, v, b: m.apply(v, b['input_ids'], attention_mask=b['attention_mask'],
                                         mutable=['intermediates']), static_argnums=0)


def _planted(model_type, big=40.0):
  """Random model with two large-gamma dims in every LayerNorm (LN-output channel outliers)
  whose rows in the next Linears are as small."""
  model = models.build(_cfg(model_type))
  variables = models.init_variables(model, jax.random.PRNGKey(0), seq_len=SEQ)
  p = jax.tree_util.tree_map(np.array, variables['params'])
  for ln_path, consumers in migration.ln_consumers(model.cfg):
    ln = migration._get(p, ln_path)
    ln['scale'][[2, 9]] = big
    for c in consumers:   # as in LLMs: the outlier channels meet small weights
      migration._get(p, c)['kernel'][[2, 9], :] /= big
  return model, {'params': p}


@pytest.mark.parametrize('model_type', ['opt', 'bert'])
def test_smoothquant_keeps_fp_output_and_matches_the_formula(model_type):
  model, variables = _planted(model_type)
  cal = _batches(2, seed=1)
  sm, sv = quant.smoothquant(model, variables, cal, alpha=0.5)
  b = _batches(1, seed=2)[0]
  ref = np.asarray(_apply(model, variables, b)[0].logits)
  np.testing.assert_allclose(np.asarray(_apply(sm, sv, b)[0].logits), ref, atol=1e-5, rtol=1e-5)
  # Composes with Gamma Migration.
  gm, gv = quant.gamma_migration(model, variables)
  gsm, gsv = quant.smoothquant(gm, gv, cal, alpha=0.5)
  np.testing.assert_allclose(np.asarray(_apply(gsm, gsv, b)[0].logits), ref, atol=1e-5,
                             rtol=1e-5)

  act = sq.activation_absmax(model, variables, cal)
  if model_type == 'opt':
    # max |X_j| from the sown attention LN outputs (valid tokens only), numpy.
    want = np.zeros(32)
    for c in cal:
      x = np.asarray(_apply(model, variables, c)[1]['intermediates']['decoder_layer_1']
                     ['attn_ln_output'][0])
      want = np.maximum(want, np.abs(x[c['attention_mask'].astype(bool)]).max(0))
    np.testing.assert_allclose(act[('decoder_layer_1', 'attention_ln')], want, rtol=1e-6)
  for ln_path, consumers in migration.ln_consumers(model.cfg):
    w = np.concatenate([np.asarray(migration._get(variables['params'], c)['kernel'])
                        for c in consumers], axis=1)
    s = (np.maximum(act[ln_path], 1e-5) ** 0.5
         / np.maximum(np.abs(w).max(1), 1e-5) ** 0.5)
    ln0, ln1 = migration._get(variables['params'], ln_path), migration._get(sv['params'], ln_path)
    np.testing.assert_allclose(ln1['scale'], ln0['scale'] / s, rtol=1e-5)
    np.testing.assert_allclose(ln1['bias'], ln0['bias'] / s, rtol=1e-5, atol=1e-7)
    for c in consumers:
      np.testing.assert_allclose(migration._get(sv['params'], c)['kernel'],
                                 np.asarray(migration._get(variables['params'], c)['kernel'])
                                 * s[:, None], rtol=1e-5)


def test_smoothquant_lowers_w8a8_error_on_planted_ln_outliers():
  model, variables = _planted('opt')
  cal, test = _batches(3, seed=1), _batches(2, seed=3)
  qcfg = quant.config(est_num_batches=3, per_channel=True)

  def err(m, v):
    qm, qv = quant.calibrate(m, v, cal, qcfg)
    e = []
    for b in test:
      fp = np.asarray(_apply(model, variables, b)[0].logits, np.float64)
      q = np.asarray(_apply(qm, qv, b)[0].logits, np.float64)
      e.append(np.linalg.norm(q - fp) / np.linalg.norm(fp))
    return float(np.mean(e))

  plain = err(model, variables)
  smooth = err(*quant.smoothquant(model, variables, cal, alpha=0.5))
  print(f'planted LN outliers, W8A8 relative logit error: plain {plain:.4f}  '
        f'SmoothQuant {smooth:.4f}')
  assert smooth < 0.7 * plain
