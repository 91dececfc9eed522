"""SmoothQuant: FP output unchanged (pre-LN OPT, post-LN BERT, after Gamma Migration), the
smoothing factors against a numpy restatement, and lower W8A8 error on planted LN outliers."""
import jax
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


# ---- the original's W8A8 setting against a torch restatement of its fake quant --------------
def _torch_w8a8_error(tm, cal, test, alpha, smooth=True, bmm=False):
  """Relative logit error vs FP of a torch restatement of the original's pipeline: activation
  maxima per input channel of every Linear over the calibration set, smoothing of
  self_attn_layer_norm -> q/k/v and final_layer_norm -> fc1 (max|W| and s clamped at 1e-5),
  then W8A8 on every Linear of the decoder layers: per-output-channel absmax weights,
  per-token absmax inputs (scales clamped at 1e-5 / 127); lm_head floating point."""
  import copy
  import torch
  tq = copy.deepcopy(tm)
  lins = {n: m for n, m in tq.named_modules() if isinstance(m, torch.nn.Linear)}
  act = {}

  def hook(name):
    def f(m, inp, out):
      a = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs().amax(0)
      act[name] = a if name not in act else torch.maximum(act[name], a)
    return f
  hs = [m.register_forward_hook(hook(n)) for n, m in lins.items()]
  with torch.no_grad():
    for ids in cal:
      tq(torch.tensor(ids))
  for h in hs:
    h.remove()

  def absmax_q(t, dim):
    s = t.abs().amax(dim=dim, keepdim=True).clamp(min=1e-5) / 127
    return (t / s).round() * s

  layers = tq.model.decoder.layers
  with torch.no_grad():
    for i, layer in enumerate(layers):
      pre = f'model.decoder.layers.{i}.'
      att = layer.self_attn
      if smooth:
        for ln, fcs, key in ((layer.self_attn_layer_norm, [att.q_proj, att.k_proj, att.v_proj],
                              'self_attn.q_proj'), (layer.final_layer_norm, [layer.fc1], 'fc1')):
          w = torch.stack([fc.weight.abs().amax(0) for fc in fcs]).amax(0).clamp(min=1e-5)
          s = (act[pre + key].pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
          ln.weight.div_(s)
          ln.bias.div_(s)
          for fc in fcs:
            fc.weight.mul_(s.view(1, -1))
      for parent, names in ((att, ('q_proj', 'k_proj', 'v_proj', 'out_proj')),
                            (layer, ('fc1', 'fc2'))):
        for n in names:
          lin = getattr(parent, n)
          lin.weight.copy_(absmax_q(lin.weight, -1))
          q_out = bmm and n in ('q_proj', 'k_proj', 'v_proj')
          lin.forward = (lambda lin, q_out: lambda x: (
              (lambda y: absmax_q(y, -1) if q_out else y)(
                  torch.nn.functional.linear(absmax_q(x, -1), lin.weight, lin.bias))))(lin, q_out)
    errs = []
    for ids in test:
      fp = tm(torch.tensor(ids)).logits.double()
      q = tq(torch.tensor(ids)).logits.double()
      errs.append(float((q - fp).norm() / fp.norm()))
  return float(np.mean(errs))


@pytest.fixture(scope='module')
def planted_hf_opt(tmp_path_factory):
  """A tiny transformers OPT with LLM-like LayerNorm outlier channels (large gamma, small
  weight rows behind them), loaded through oqt_jax.models.hf."""
  import torch
  import transformers as T
  from oqt_jax.models import hf
  torch.manual_seed(0)
  cfg = T.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                    num_attention_heads=4, max_position_embeddings=40, word_embed_proj_dim=64,
                    attn_implementation='eager')
  tm = T.OPTForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in tm.named_parameters():
      if p.dim() == 2:
        p.normal_(0.0, 0.1)
    for layer in tm.model.decoder.layers:
      att = layer.self_attn
      for ln, fcs in ((layer.self_attn_layer_norm, [att.q_proj, att.k_proj, att.v_proj]),
                      (layer.final_layer_norm, [layer.fc1])):
        ln.weight[[3, 17, 40]] = torch.tensor([60.0, -45.0, 30.0])
        for fc in fcs:
          fc.weight[:, [3, 17, 40]] /= 20.0
  d = tmp_path_factory.mktemp('sq_opt')
  tm.save_pretrained(d)
  model, variables = hf.load(str(d))
  rng = np.random.default_rng(5)
  cal = [rng.integers(3, VOCAB, (4, 16)).astype(np.int64) for _ in range(2)]
  test = [rng.integers(3, VOCAB, (4, 16)).astype(np.int64) for _ in range(2)]
  return tm, model, variables, cal, test


def _ours_error(model, variables, cal, test, qcfg):
  qm, qv = sq.smoothquant_method(model, variables, [{'input_ids': c} for c in cal], qcfg)
  errs = []
  for ids in test:
    b = {'input_ids': ids, 'attention_mask': np.ones(ids.shape, np.int32)}
    fp = np.asarray(_apply(model, variables, b)[0].logits, np.float64)
    q = np.asarray(_apply(qm, qv, b)[0].logits, np.float64)
    errs.append(np.linalg.norm(q - fp) / np.linalg.norm(fp))
  return float(np.mean(errs)), qm


def test_original_w8a8_setting_matches_torch_restatement(planted_hf_opt):
  tm, model, variables, cal, test = planted_hf_opt
  want = _torch_w8a8_error(tm, cal, test, 0.5)
  qcfg = quant.config(**dict(sq.PRESET, est_num_batches=len(cal)))
  got, qm = _ours_error(model, variables, cal, test, qcfg)
  # The restatement without smoothing: SmoothQuant matters on this model.
  plain = _torch_w8a8_error(tm, cal, test, 0.5, smooth=False)
  # quantize_bmm_input: Q, K, V outputs per token as well.
  want_bmm = _torch_w8a8_error(tm, cal, test, 0.5, bmm=True)
  got_bmm, _ = _ours_error(model, variables, cal, test, quant.config(
      **dict(sq.PRESET, est_num_batches=len(cal), quant_dict="{'q': 8, 'k': 8, 'v': 8}")))
  print(f'W8A8 relative logit error: ours {got:.3e}, torch restatement {want:.3e} '
        f'(ratio {got / want:.3f}); without smoothing {plain:.3e}; '
        f'bmm inputs too: ours {got_bmm:.3e}, torch {want_bmm:.3e}')
  assert plain > 2 * want
  assert want / 1.5 <= got <= 1.5 * want
  assert want_bmm / 1.5 <= got_bmm <= 1.5 * want_bmm
  # Exactly the Linear inputs and weights of the decoder layers are quantized.
  on = {s.name for s in qm.quant.rules.table() if s.enabled}
  assert on == {f'{b}{i}' for b in ('a', 'c', 'x', 'f', 'wq', 'wk', 'wv', 'wg', 'wf', 'wh')
                for i in range(2)}
  # The per-tensor static variant runs and is worse than per-token on these outliers.
  static, _ = _ours_error(model, variables, cal, test,
                          quant.config(**dict(sq.PRESET_STATIC, est_num_batches=len(cal))))
  assert static > got
