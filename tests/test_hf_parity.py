"""Parity of the Flax BERT/OPT with transformers (PyTorch, CPU) on tiny random checkpoints."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from oqt_jax.errors import CheckpointError
from oqt_jax.models import hf

TOL = 1e-4
VOCAB = 101


def _bert_cfg(**kw):
  return T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=40, attn_implementation='eager',
                      **kw)


def _opt_cfg(**kw):
  base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
              num_attention_heads=4, max_position_embeddings=40, attn_implementation='eager')
  base.update(kw)
  return T.OPTConfig(**base)


CASES = {
    'bert_mlm': lambda: T.BertForMaskedLM(_bert_cfg()),
    'bert_cls': lambda: T.BertForSequenceClassification(_bert_cfg(num_labels=3)),
    'bert_reg': lambda: T.BertForSequenceClassification(_bert_cfg(num_labels=1)),
    'bert_base': lambda: T.BertModel(_bert_cfg()),
    'opt_clm': lambda: T.OPTForCausalLM(_opt_cfg()),
    # OPT-350m shape: post-LN, word_embed_proj_dim != hidden_size (project_in / project_out).
    'opt_350m_like': lambda: T.OPTForCausalLM(_opt_cfg(do_layer_norm_before=False,
                                                       word_embed_proj_dim=16)),
    'opt_base': lambda: T.OPTModel(_opt_cfg()),
}


def _randomise(model):
  """Non-trivial LayerNorm / bias values so a mapping mistake cannot hide behind ones/zeros."""
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'LayerNorm' in name or 'layer_norm' in name:
        p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  torch.manual_seed(0)
  out = {}
  for name, make in CASES.items():
    m = make().eval()
    _randomise(m)
    d = tmp_path_factory.mktemp(name)
    m.save_pretrained(d)
    out[name] = (str(d), m)
  return out


def _batch(pad_side):
  rng = np.random.default_rng(1)
  ids = rng.integers(3, VOCAB, size=(3, 12)).astype(np.int64)
  mask = np.ones_like(ids)
  if pad_side == 'right':
    mask[0, 9:] = 0
    mask[2, 5:] = 0
  else:
    mask[0, :3] = 0
    mask[2, :7] = 0
  ids[mask == 0] = 1
  return ids, mask


def _torch_out(m, ids, mask):
  with torch.no_grad():
    return m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             output_hidden_states=True)


def _valid(x, mask, per_token):
  return x[mask.astype(bool)] if per_token else x


@pytest.mark.parametrize('name', list(CASES))
def test_logits_and_hidden_states_match_transformers(checkpoints, name):
  path, tm = checkpoints[name]
  model, variables = hf.load(path)
  for pad_side in ('right', 'left'):
    ids, mask = _batch(pad_side)
    ref = _torch_out(tm, ids, mask)
    out = model.apply(variables, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    # Rows of fully padded positions are arbitrary in both; compare every real token.
    per_token = True
    if hasattr(ref, 'logits'):
      got, want = np.asarray(out.logits), ref.logits.numpy()
      if got.ndim == 2:  # sequence classification: one row per example
        per_token = False
      assert got.shape == want.shape
      np.testing.assert_allclose(_valid(got, mask, per_token), _valid(want, mask, per_token),
                                 atol=TOL, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for a, b in zip(out.hidden_states, ref.hidden_states):
      np.testing.assert_allclose(_valid(np.asarray(a), mask, True), _valid(b.numpy(), mask, True),
                                 atol=TOL, rtol=0)


@pytest.mark.parametrize('name', ['bert_mlm', 'bert_cls', 'opt_clm', 'opt_350m_like'])
def test_round_trip_through_hf_save(checkpoints, tmp_path, name):
  path, tm = checkpoints[name]
  model, variables = hf.load(path)
  out_dir = hf.save(model, variables, tmp_path / 'saved')
  reloaded = type(tm).from_pretrained(out_dir, attn_implementation='eager').eval()
  ids, mask = _batch('right')
  a = _torch_out(tm, ids, mask).logits.numpy()
  b = _torch_out(reloaded, ids, mask).logits.numpy()
  np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
  # ... and loading our own export again gives identical parameters.
  _, v2 = hf.load(out_dir)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(x, y), variables, v2)


def test_pytorch_model_bin_is_read(checkpoints, tmp_path):
  _, tm = checkpoints['opt_clm']
  tm.config.save_pretrained(tmp_path)
  torch.save(tm.state_dict(), tmp_path / 'pytorch_model.bin')
  model, variables = hf.load(tmp_path)
  ids, mask = _batch('right')
  got = np.asarray(model.apply(variables, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)).logits)
  np.testing.assert_allclose(_valid(got, mask, True),
                             _valid(_torch_out(tm, ids, mask).logits.numpy(), mask, True),
                             atol=TOL, rtol=0)


def _copy_ckpt(src, dst, edit):
  from safetensors.numpy import load_file, save_file
  os.makedirs(dst, exist_ok=True)
  sd = load_file(os.path.join(src, 'model.safetensors'))
  edit(sd)
  save_file(sd, os.path.join(dst, 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(src, 'config.json')) as f, open(os.path.join(dst, 'config.json'), 'w') as g:
    g.write(f.read())


def test_shape_mismatch_names_the_tensor(checkpoints, tmp_path):
  src, _ = checkpoints['bert_mlm']
  key = 'bert.encoder.layer.1.intermediate.dense.weight'
  _copy_ckpt(src, tmp_path, lambda sd: sd.__setitem__(key, sd[key][:, :5].copy()))
  with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.intermediate\.dense\.weight.*shape"):
    hf.load(tmp_path)


def test_missing_tensor_names_the_tensor(checkpoints, tmp_path):
  src, _ = checkpoints['opt_clm']
  key = 'model.decoder.layers.0.fc2.bias'
  _copy_ckpt(src, tmp_path, lambda sd: sd.pop(key))
  with pytest.raises(CheckpointError, match=r"decoder\.layers\.0\.fc2\.bias.*missing"):
    hf.load(tmp_path)


def test_missing_dir_and_bad_config(tmp_path):
  with pytest.raises(CheckpointError, match='config.json'):
    os.makedirs(tmp_path / 'empty')
    hf.load(tmp_path / 'empty')
  (tmp_path / 'x').mkdir()
  (tmp_path / 'x' / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
  with pytest.raises(CheckpointError, match="model_type='gpt2'"):
    hf.load(tmp_path / 'x')


@pytest.mark.parametrize('name,gate', [('bert_mlm', 'conditional_per_token'),
                                       ('opt_clm', 'conditional_per_head')])
def test_switch_on_gates_for_fine_tuning(checkpoints, tmp_path, name, gate):
  """Fine-tuning mode keeps the pretrained function (gate ~ 1 at init); the variant is saved."""
  path, tm = checkpoints[name]
  model, variables = hf.load(path, gate=gate, gate_init=0.25, fine_tuning=True,
                             softmax='clipped(-.0:1)')
  assert model.cfg.gate == gate and model.cfg.fine_tuning
  gate_params = sorted(k for k in variables['params']['decoder_layer_0' if 'opt' in name
                                                 else 'encoder_layer_0']['attention']['gate'])
  assert gate_params == ['bias', 'kernel']
  ids, mask = _batch('right')
  got = np.asarray(model.apply(variables, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)).logits)
  want = _torch_out(tm, ids, mask).logits.numpy()
  err = np.abs(_valid(got, mask, True) - _valid(want, mask, True)).max()
  assert 0 < err < 0.05 * np.abs(want).max()
  out_dir = hf.save(model, variables, tmp_path / 'gated')
  m2, v2 = hf.load(out_dir)
  assert m2.cfg.gate == gate and m2.cfg.gate_init == 0.25
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(x, y), variables, v2)


def test_new_classification_head_on_mlm_checkpoint(checkpoints):
  path, _ = checkpoints['bert_mlm']
  model, variables = hf.load(path, head='cls', num_labels=2)
  ids, mask = _batch('right')
  out = model.apply(variables, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  assert out.logits.shape == (3, 2)
  assert 'classifier' in variables['params'] and 'mlm_bias' not in variables['params']
