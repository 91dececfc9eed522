"""Text generation with the KV cache: HF greedy parity, cache == full forward, sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from oqt_jax import models, quant
from oqt_jax.errors import ConfigError
from oqt_jax.models.generate import _compiled
from oqt_jax.models import hf

VOCAB = 64
PAD, EOS = 1, 2


def _prompt():
  rng = np.random.default_rng(3)
  ids = rng.integers(3, VOCAB, size=(3, 7)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, :3] = 0          # left padding
  mask[2, :5] = 0
  ids[mask == 0] = PAD
  return ids, mask


@pytest.fixture(scope='module')
def hf_opt(tmp_path_factory):
  torch.manual_seed(0)
  cfg = T.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                    num_attention_heads=4, max_position_embeddings=40, pad_token_id=PAD,
                    bos_token_id=EOS, eos_token_id=EOS, attn_implementation='eager')
  m = T.OPTForCausalLM(cfg).eval()
  with torch.no_grad():   # larger weights: peaked, input-dependent next-token distributions
    for name, p in m.named_parameters():
      if p.dim() == 2:
        p.normal_(0.0, 0.3)
  d = tmp_path_factory.mktemp('opt_gen')
  m.save_pretrained(d)
  return m, str(d)


def test_greedy_matches_hf_generate(hf_opt):
  tm, path = hf_opt
  model, variables = hf.load(path)
  ids, mask = _prompt()
  n = 10
  with torch.no_grad():
    want = tm.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                       do_sample=False, pad_token_id=PAD, eos_token_id=EOS,
                       min_new_tokens=0).numpy()
  got = np.asarray(models.generate(model, variables, ids, n, attention_mask=mask,
                                   eos_token_id=EOS, pad_token_id=PAD))
  assert got.shape == (3, 7 + n)
  # HF stops once every row has finished; past that our rows hold padding only.
  np.testing.assert_array_equal(got[:, :want.shape[1]], want)
  assert np.all(got[:, want.shape[1]:] == PAD)
  assert len(set(map(tuple, got[:, 7:]))) > 1          # the prompts matter


def _small_opt(**kw):
  cfg = models.ModelConfig(model_type='opt', vocab_size=VOCAB, hidden_size=32, num_layers=2,
                           num_heads=4, intermediate_size=64, max_position_embeddings=40,
                           pad_token_id=PAD, init_std=0.3, **kw)
  model = models.build(cfg)
  return model, models.init_variables(model, jax.random.PRNGKey(1))


@pytest.fixture(scope='module')
def gated_clipped():
  """A clipped-softmax, gated OPT and its W8A8 calibration (frozen ranges)."""
  model, variables = _small_opt(softmax='clipped(-.05:1.02)', gate='conditional_per_token',
                                gate_mlp=True)
  rng = np.random.default_rng(0)
  batches = [{'input_ids': rng.integers(3, VOCAB, size=(2, 12)),
              'attention_mask': np.ones((2, 12), np.int32)} for _ in range(2)]
  qmodel, qvars = quant.calibrate(model, variables, batches, quant.config(est_num_batches=2))
  return model, variables, qmodel, qvars


_FWD = {}


def _full_logits(model, variables, seq, mask):
  if model not in _FWD:
    _FWD[model] = jax.jit(lambda v, s, m: model.apply(v, s, attention_mask=m).logits)
  return np.asarray(_FWD[model](variables, jnp.asarray(seq), jnp.asarray(mask)))


N_NEW = 5


@pytest.mark.parametrize('which', ['fp', 'quantized'])
def test_cached_decode_equals_full_forward(gated_clipped, which):
  model, variables, qmodel, qvars = gated_clipped
  m, v = (model, variables) if which == 'fp' else (qmodel, qvars)
  ids, mask = _prompt()
  n = N_NEW
  out = np.asarray(models.generate(m, v, ids, n, attention_mask=mask))
  full_mask = np.concatenate([mask, np.ones((3, n), np.int64)], 1)
  full = _full_logits(m, v, out, full_mask)          # one forward over the whole result
  # Each new token is the argmax of the full forward's logits at the previous position.
  np.testing.assert_array_equal(out[:, 7:], full[:, 6:-1].argmax(-1))
  if which == 'quantized':   # it really ran through the quantizers
    assert np.abs(full - _full_logits(model, variables, out, full_mask)).max() > 1e-3
    return
  # And the cached logits equal the full forward's: prefill, then one token per step.
  step = jax.jit(lambda v, tok, i: m.apply(v, tok, attention_mask=jnp.asarray(full_mask),
                                           decode=True, cache_index=i, mutable=['cache']))
  res, upd = step(v, jnp.asarray(ids), 0)
  np.testing.assert_allclose(np.asarray(res.logits)[mask == 1], full[:, :7][mask == 1],
                             rtol=1e-4, atol=1e-4)
  for i in range(n):
    res, upd = step(dict(v, cache=upd['cache']), jnp.asarray(out[:, 7 + i:8 + i]), 7 + i)
    np.testing.assert_allclose(np.asarray(res.logits)[:, 0], full[:, 7 + i], rtol=1e-4,
                               atol=1e-4)


def test_sampling(gated_clipped):
  model, variables, _, _ = gated_clipped
  ids, mask = _prompt()
  n = N_NEW
  sample = lambda t, seed: np.asarray(models.generate(
      model, variables, ids, n, temperature=t, top_k=3, seed=seed, attention_mask=mask))
  greedy = np.asarray(models.generate(model, variables, ids, n, attention_mask=mask))
  np.testing.assert_array_equal(sample(1e-4, 5), greedy)     # near-zero temperature
  s1, s1b, s2 = sample(1.5, 1), sample(1.5, 1), sample(1.5, 2)
  np.testing.assert_array_equal(s1, s1b)            # a seed fixes the sample
  assert not np.array_equal(s1, s2)
  full_mask = np.concatenate([mask, np.ones((3, n), np.int64)], 1)
  full = _full_logits(model, variables, s1, full_mask)[:, 6:-1]      # (B, n, V)
  top3 = np.argsort(-full, axis=-1)[..., :3]
  assert np.all((top3 == s1[:, 7:, None]).any(-1))   # every sample is among the top 3
  # Compiled once per (model, shapes, n, top_k, greedy): seeds / temperatures reuse it.
  assert _compiled(model, n, 3, False, None, PAD)._cache_size() == 1


def test_generate_errors(gated_clipped):
  model, variables, _, _ = gated_clipped
  ids = np.full((1, 4), 5)
  per_head = models.build(model.cfg.replace(gate='conditional_per_head', gate_mlp=False))
  with pytest.raises(ConfigError, match='conditional_per_head'):
    models.generate(per_head, None, ids, 2)
  with pytest.raises(ConfigError, match='max_position_embeddings'):
    models.generate(model, variables, ids, 100)
  with pytest.raises(ConfigError, match='temperature'):
    models.generate(model, variables, ids, 2, temperature=-1.0)
  with pytest.raises(ConfigError, match='left-padded'):
    models.generate(model, variables, ids, 2, attention_mask=np.array([[1, 1, 1, 0]]))
