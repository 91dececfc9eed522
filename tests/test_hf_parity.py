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


# ---- gated checkpoints of the original PyTorch code ----------------------------------------
def _original_gates(kind, num_layers, prefix, h=4, d=8, d_model=32, seed=0):
  """Gate tensors as the original attention modules name them (torch Linear weights)."""
  torch.manual_seed(seed)
  out = {}
  for i in range(num_layers):
    a = prefix.format(i) + '.alpha'
    if kind == 'unconditional':
      out[a] = torch.randn(h)
    elif kind == 'all_features':
      lin = torch.nn.Linear(d_model, h)
      out[a + '.weight'], out[a + '.bias'] = lin.weight, lin.bias
    else:
      for j in range(h):
        if kind == 'mlp':
          l0, l2 = torch.nn.Linear(d, d // 4), torch.nn.Linear(d // 4, 1)
          out.update({f'{a}.{j}.0.weight': l0.weight, f'{a}.{j}.0.bias': l0.bias,
                      f'{a}.{j}.2.weight': l2.weight, f'{a}.{j}.2.bias': l2.bias})
        else:
          lin = torch.nn.Linear(d, 1)
          out[f'{a}.{j}.weight'], out[f'{a}.{j}.bias'] = lin.weight, lin.bias
  return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _np_gate(kind, t, a, x, h=4):
  """numpy restatement of the original gate on the gate input x (B, T, D): (B|1, H, T|1, 1)."""
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  g = lambda k: t[f'{a}{k}'].numpy().astype(np.float64)
  if kind == 'unconditional':
    return sig(g(''))[None, :, None, None]
  if kind == 'all_features':
    return sig(x @ g('.weight').T + g('.bias')).transpose(0, 2, 1)[..., None]
  b, n, dm = x.shape
  xh = x.reshape(b, n, h, dm // h)
  out = []
  for j in range(h):
    if kind == 'mlp':
      hid = np.maximum(xh[:, :, j] @ g(f'.{j}.0.weight').T + g(f'.{j}.0.bias'), 0)
      z = hid @ g(f'.{j}.2.weight').T + g(f'.{j}.2.bias')
    else:
      z = xh[:, :, j] @ g(f'.{j}.weight').T + g(f'.{j}.bias')
    out.append(sig(z))                                   # (B, T, 1)
  return np.stack(out, 1)                                # (B, H, T, 1)


def _write_original(src, dst, extra, config_edit=None):
  from safetensors.torch import load_file, save_file
  os.makedirs(dst, exist_ok=True)
  sd = load_file(os.path.join(src, 'model.safetensors'))
  sd.update(extra)
  save_file(sd, os.path.join(dst, 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(src, 'config.json')) as f:
    cfg = json.load(f)
  if config_edit:
    config_edit(cfg)
  with open(os.path.join(dst, 'config.json'), 'w') as g:
    json.dump(cfg, g)


GATE_KINDS = {
    'mlp': ('bert_mlm', dict(gate='conditional_per_token', gate_mlp=True)),
    'linear': ('opt_clm', dict(gate='conditional_per_token')),
    'all_features': ('opt_clm', dict(gate='conditional_per_token',
                                     gate_linear_all_features=True)),
    'unconditional': ('bert_mlm', dict(gate='unconditional_per_head')),
}


@pytest.mark.parametrize('kind', list(GATE_KINDS))
def test_original_gated_checkpoint_loads_its_gates(checkpoints, tmp_path, kind):
  name, overrides = GATE_KINDS[kind]
  src, _ = checkpoints[name]
  prefix = ('bert.encoder.layer.{}.attention.self' if name.startswith('bert')
            else 'model.decoder.layers.{}.self_attn')
  tensors = _original_gates(kind, 2, prefix)
  _write_original(src, tmp_path, tensors)
  model, variables = hf.load(tmp_path, **overrides)
  ids, mask = _batch('right')
  out, inter = model.apply(variables, jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
                           mutable=['intermediates'])
  inter = inter['intermediates']
  for i in range(2):
    if name.startswith('bert'):
      layer = inter[f'encoder_layer_{i}']
      x = np.asarray(out.hidden_states[i], np.float64)        # BERT: the layer input
    else:
      layer = inter[f'decoder_layer_{i}']
      x = np.asarray(layer['attn_ln_output'][0], np.float64)  # OPT: self_attn_layer_norm out
    got = np.asarray(layer['attention']['gate_probs'][0])
    want = _np_gate(kind, tensors, prefix.format(i) + '.alpha', x)
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape) if kind ==
                               'unconditional' else want, atol=1e-5, rtol=0)


def test_gate_errors_name_the_tensors(checkpoints, tmp_path):
  src, _ = checkpoints['bert_mlm']
  prefix = 'bert.encoder.layer.{}.attention.self'
  # Gate tensors in the checkpoint, but loaded without a gate: not silently dropped.
  _write_original(src, tmp_path / 'a', _original_gates('mlp', 2, prefix))
  with pytest.raises(CheckpointError, match=r"attention\.self\.alpha.*gate="):
    hf.load(tmp_path / 'a')
  # MLP gate tensors loaded as a single-Linear gate: the expected tensor is named.
  with pytest.raises(CheckpointError, match=r"encoder\.layer\.0\.attention\.self\.alpha\.0\."
                                            r"weight.*missing"):
    hf.load(tmp_path / 'a', gate='conditional_per_token')
  # config.json declares a gate the checkpoint lacks: an error, not fresh gates.
  declare = lambda c: c.update(oqt_jax={'gate': 'conditional_per_token'})
  _write_original(src, tmp_path / 'b', {}, declare)
  with pytest.raises(CheckpointError, match=r"declares gate.*attention\.self\.gate\.kernel"):
    hf.load(tmp_path / 'b')


def test_export_of_gated_or_clipped_model_warns(checkpoints, tmp_path, capsys):
  path, _ = checkpoints['opt_clm']
  model, variables = hf.load(path)
  hf.save(model, variables, tmp_path / 'vanilla')
  assert 'WARNING' not in capsys.readouterr().err
  model, variables = hf.load(path, softmax='clipped(-.025:1)')
  hf.save(model, variables, tmp_path / 'clipped')
  err = capsys.readouterr().err
  assert 'WARNING' in err and 'clipped softmax' in err and 'generate' in err


def test_opt_has_no_dropout_after_the_embedding_sum(checkpoints):
  """Training mode (dropout on): the first layer's input is still the plain embedding sum."""
  path, tm = checkpoints['opt_clm']
  model, variables = hf.load(path)
  assert model.cfg.hidden_dropout > 0
  ids, mask = _batch('right')
  out = model.apply(variables, jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
                    deterministic=False, rngs={'dropout': jax.random.PRNGKey(3)})
  emb = tm.model.decoder.embed_tokens.weight.detach().numpy()
  pos = tm.model.decoder.embed_positions.weight.detach().numpy()
  pids = np.cumsum(mask, 1) * mask - 1 + 2                  # OPT positions, offset 2
  want = emb[ids] + pos[pids]
  np.testing.assert_allclose(_valid(np.asarray(out.hidden_states[0]), mask, True),
                             _valid(want, mask, True), atol=1e-6, rtol=0)


@pytest.mark.parametrize('softmax_T', [128, 300])
def test_foreign_opt_uses_the_configs_softmax_T(checkpoints, softmax_T):
  import ml_collections
  from oqt_jax.evaluate import setup
  path, _ = checkpoints['opt_clm']
  config = ml_collections.ConfigDict({'model': {'softmax': 'vanilla', 'alpha': 12.0,
                                                'softmax_T': softmax_T, 'gate': 'none'}})
  model, _, _ = setup.load_model(config, None, hf_model=path)
  assert model.cfg.softmax_T == softmax_T
  assert model.cfg.clip_gamma_zeta[0] == pytest.approx(-12.0 / softmax_T)
