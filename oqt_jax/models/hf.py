"""HF checkpoint interop: HF BERT / OPT checkpoint dirs <-> (Flax model, variables).

  model, variables = hf.load(path)      # dir with config.json + model.safetensors | pytorch_model.bin
                                        # (sharded *.index.json too), or a hub name when online
  out = model.apply(variables, input_ids, attention_mask=mask)
  hf.save(model, variables, out_dir)    # loads back in transformers with from_pretrained

Supported architectures: BertModel, BertForMaskedLM, BertForPreTraining (MLM part),
BertForSequenceClassification, OPTModel, OPTForCausalLM. Attention variants can be switched on
when loading (`softmax='clipped(-.025:1)'`, `gate='conditional_per_token'`, `fine_tuning=True`,
...): parameters the checkpoint lacks because they are switched on here (gates, a newly
requested head) are freshly initialised; every other tensor, including the gates of a gate the
checkpoint's config.json declares, must be present with the right shape or loading fails
naming it.
Variant settings are stored in config.json under "oqt_jax" and gate tensors under
'<layer>.attention.self.gate.*' / '<layer>.self_attn.gate.*', which transformers ignores
(`save` says so on stderr: transformers runs such a model without its gates and clipping;
generate with oqt_jax, models.generate or eval.py --prompt).

Gated checkpoints saved by the original PyTorch code (HF layout, the gate under
'<layer>.attention.self.alpha*' (BERT) / '<layer>.self_attn.alpha*' (OPT)) load with their
gates when the gate settings are given (their config.json does not record them):
  alpha                  (H,)          gate='unconditional_per_head'
  alpha.weight / .bias   (H, D), (H,)  gate='conditional_per_token', gate_linear_all_features
  alpha.{h}.weight/.bias (1, d), (1,)  gate='conditional_per_token' (or _per_head)
  alpha.{h}.0.* / .2.*   MLP gate      ... and gate_mlp=True
A checkpoint holding gate tensors loaded without a gate, or whose config.json declares a gate
("oqt_jax": {"gate": ...}) but lacks its tensors, is an error naming them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oqt_jax import hub
from oqt_jax.errors import CheckpointError
from oqt_jax.models import config as mcfg
from oqt_jax.models.bert import Bert
from oqt_jax.models.opt import POSITION_OFFSET, Opt

log = logging.getLogger(__name__)

VARIANT_FIELDS = ('softmax', 'alpha', 'softmax_T', 'gate', 'gate_mlp', 'gate_linear_all_features',
                  'gate_init', 'fine_tuning', 'gate_mlp2', 'gate_last_init_std', 'norm')
ARCH_HEADS = {
    'BertModel': 'none', 'BertForMaskedLM': 'mlm', 'BertForPreTraining': 'mlm',
    'BertForSequenceClassification': 'cls', 'OPTModel': 'none', 'OPTForCausalLM': 'clm',
}
HEAD_ARCH = {('bert', 'none'): 'BertModel', ('bert', 'mlm'): 'BertForMaskedLM',
             ('bert', 'cls'): 'BertForSequenceClassification', ('opt', 'none'): 'OPTModel',
             ('opt', 'clm'): 'OPTForCausalLM'}
# Checkpoint tensors that are fine to leave unused (tied copies, buffers, heads we don't build).
IGNORABLE = ('position_ids', 'cls.predictions.decoder.weight', 'cls.predictions.decoder.bias',
             'cls.seq_relationship', 'lm_head.weight', 'pooler.dense', 'embed_positions._float')


# ---------------------------------------------------------------- name mapping ------------
def _dense(flax_path, hf_prefix, bias=True):
  yield flax_path + ('kernel',), hf_prefix + '.weight', True
  if bias:
    yield flax_path + ('bias',), hf_prefix + '.bias', False


def _ln(flax_path, hf_prefix):
  yield flax_path + ('scale',), hf_prefix + '.weight', False
  yield flax_path + ('bias',), hf_prefix + '.bias', False


def _gate(cfg: mcfg.ModelConfig, flax_path, hf_prefix):
  if cfg.gate == 'none':
    return
  if cfg.gate == 'unconditional_per_head':
    names = ('alpha',)
  elif cfg.gate_linear_all_features:
    names = ('kernel', 'bias')
  elif cfg.gate_mlp or cfg.gate_mlp2:
    names = ('kernel1', 'bias1', 'kernel2', 'bias2')
  else:
    names = ('kernel', 'bias')
  for n in names:
    yield flax_path + ('gate', n), f'{hf_prefix}.gate.{n}', False


def _sink(cfg: mcfg.ModelConfig, flax_path, hf_prefix):
  if str(cfg.softmax).strip() == 'sink':
    yield flax_path + ('sink',), f'{hf_prefix}.sink', False


def _top(entries):
  """Head tensors live outside the base model's prefix: mark them with '@'."""
  for fpath, key, transpose in entries:
    yield fpath, '@' + key, transpose


def param_map(cfg: mcfg.ModelConfig) -> Iterator[tuple[tuple, str, bool]]:
  """(flax param path, HF tensor name without the model prefix, transpose?) for every param.
  A single-scale RMSNorm model (norm='ssnorm') stores each norm's scalar as its '.weight' and
  has no '.bias'."""
  for fpath, key, transpose in _param_map(cfg):
    if cfg.norm == 'ssnorm' and key.endswith(('LayerNorm.bias', 'layer_norm.bias')):
      continue
    yield fpath, key, transpose


def _param_map(cfg: mcfg.ModelConfig) -> Iterator[tuple[tuple, str, bool]]:
  if cfg.model_type == 'bert':
    yield ('word_embeddings', 'embedding'), 'embeddings.word_embeddings.weight', False
    yield ('embeddings', 'position_embeddings', 'embedding'), 'embeddings.position_embeddings.weight', False
    yield ('embeddings', 'token_type_embeddings', 'embedding'), 'embeddings.token_type_embeddings.weight', False
    yield from _ln(('embeddings', 'LayerNorm'), 'embeddings.LayerNorm')
    for i in range(cfg.num_layers):
      f, h = (f'encoder_layer_{i}',), f'encoder.layer.{i}'
      for n in ('query', 'key', 'value'):
        yield from _dense(f + ('attention', n), f'{h}.attention.self.{n}')
      yield from _gate(cfg, f + ('attention',), f'{h}.attention.self')
      yield from _sink(cfg, f + ('attention',), f'{h}.attention.self')
      yield from _dense(f + ('attention', 'out'), f'{h}.attention.output.dense')
      yield from _ln(f + ('attention_ln',), f'{h}.attention.output.LayerNorm')
      yield from _dense(f + ('intermediate',), f'{h}.intermediate.dense')
      yield from _dense(f + ('output',), f'{h}.output.dense')
      yield from _ln(f + ('output_ln',), f'{h}.output.LayerNorm')
    if cfg.resolved_head == 'cls':
      yield from _dense(('pooler',), 'pooler.dense')
      yield from _top(_dense(('classifier',), 'classifier'))
    elif cfg.resolved_head == 'mlm':
      yield from _top(_dense(('mlm_transform',), 'cls.predictions.transform.dense'))
      yield from _top(_ln(('mlm_ln',), 'cls.predictions.transform.LayerNorm'))
      yield ('mlm_bias',), '@cls.predictions.bias', False
  else:
    proj = cfg.embed_dim != cfg.hidden_size
    yield ('embed_tokens', 'embedding'), 'decoder.embed_tokens.weight', False
    yield ('embed_positions', 'embedding'), 'decoder.embed_positions.weight', False
    if proj:
      yield ('project_in', 'kernel'), 'decoder.project_in.weight', True
      yield ('project_out', 'kernel'), 'decoder.project_out.weight', True
    for i in range(cfg.num_layers):
      f, h = (f'decoder_layer_{i}',), f'decoder.layers.{i}'
      for n, hn in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj'), ('out', 'out_proj')):
        yield from _dense(f + ('attention', n), f'{h}.self_attn.{hn}', cfg.enable_bias)
      yield from _gate(cfg, f + ('attention',), f'{h}.self_attn')
      yield from _sink(cfg, f + ('attention',), f'{h}.self_attn')
      yield from _ln(f + ('attention_ln',), f'{h}.self_attn_layer_norm')
      yield from _dense(f + ('fc1',), f'{h}.fc1', cfg.enable_bias)
      yield from _dense(f + ('fc2',), f'{h}.fc2', cfg.enable_bias)
      yield from _ln(f + ('ffn_ln',), f'{h}.final_layer_norm')
    if cfg.do_layer_norm_before and not cfg.remove_final_layer_norm:
      yield from _ln(('final_ln',), 'decoder.final_layer_norm')


def _prefix(cfg: mcfg.ModelConfig) -> str:
  """Prefix of the base model's tensors in a checkpoint of this head ('' for base models)."""
  head = cfg.resolved_head
  if cfg.model_type == 'bert':
    return '' if head == 'none' else 'bert.'
  return '' if head == 'none' else 'model.'


def _hf_name(cfg, key: str, prefixed: bool = True) -> str:
  if key.startswith('@'):
    return key[1:]
  return _prefix(cfg) + key if prefixed else key


# ---------------------------------------------------------------- config mapping ----------
def config_from_hf(hf: dict, **overrides) -> mcfg.ModelConfig:
  """ModelConfig from an HF config.json dict (+ stored variant settings, + overrides)."""
  mt = hf.get('model_type')
  archs = hf.get('architectures') or []
  head = next((ARCH_HEADS[a] for a in archs if a in ARCH_HEADS), 'none')
  if mt == 'bert':
    num_labels = len(hf['id2label']) if hf.get('id2label') else hf.get('num_labels', 2)
    if hf.get('problem_type') == 'regression':
      num_labels = 1
    d = dict(model_type='bert', head=head, vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
             num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
             intermediate_size=hf['intermediate_size'],
             max_position_embeddings=hf['max_position_embeddings'],
             type_vocab_size=hf.get('type_vocab_size', 2),
             layer_norm_eps=hf.get('layer_norm_eps', 1e-12),
             hidden_dropout=hf.get('hidden_dropout_prob', 0.1),
             attention_dropout=hf.get('attention_probs_dropout_prob', 0.1),
             activation=hf.get('hidden_act', 'gelu'), init_std=hf.get('initializer_range', 0.02),
             pad_token_id=hf.get('pad_token_id') or 0, num_labels=num_labels)
    if hf.get('position_embedding_type', 'absolute') != 'absolute':
      raise CheckpointError(f"config.json: position_embedding_type="
                            f"{hf['position_embedding_type']!r} is not supported (absolute only)")
  elif mt == 'opt':
    d = dict(model_type='opt', head=head, vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
             num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
             intermediate_size=hf['ffn_dim'], max_position_embeddings=hf['max_position_embeddings'],
             layer_norm_eps=1e-5, hidden_dropout=hf.get('dropout', 0.1),
             attention_dropout=hf.get('attention_dropout', 0.0),
             activation=hf.get('activation_function', 'relu'), init_std=hf.get('init_std', 0.02),
             pad_token_id=hf.get('pad_token_id', 1),
             do_layer_norm_before=hf.get('do_layer_norm_before', True),
             word_embed_proj_dim=hf.get('word_embed_proj_dim') or hf['hidden_size'],
             remove_final_layer_norm=hf.get('_remove_final_layer_norm', False),
             enable_bias=hf.get('enable_bias', True), softmax_T=512)
    if not hf.get('layer_norm_elementwise_affine', True):
      raise CheckpointError('config.json: layer_norm_elementwise_affine=false is not supported')
  else:
    raise CheckpointError(f"config.json: model_type={mt!r}"
                          f"{' (' + ', '.join(archs) + ')' if archs else ''} is not "
                          "implemented by oqt_jax (bert or opt: "
                          f"{', '.join(sorted(ARCH_HEADS))})")
  d.update({k: v for k, v in (hf.get('oqt_jax') or {}).items() if k in VARIANT_FIELDS})
  d.update({k: v for k, v in overrides.items() if v is not None})
  return mcfg.from_config(d)


def config_to_hf(cfg: mcfg.ModelConfig) -> dict:
  """An HF config.json dict for this model (transformers' own config class fills defaults)."""
  import transformers
  variants = {k: getattr(cfg, k) for k in VARIANT_FIELDS}
  arch = HEAD_ARCH.get((cfg.model_type, cfg.resolved_head))
  if cfg.model_type == 'bert':
    hf = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout, hidden_act=cfg.activation,
        initializer_range=cfg.init_std, pad_token_id=cfg.pad_token_id, num_labels=cfg.num_labels,
        problem_type='regression' if cfg.resolved_head == 'cls' and cfg.num_labels == 1 else None)
  else:
    hf = transformers.OPTConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, ffn_dim=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout, activation_function=cfg.activation,
        init_std=cfg.init_std, pad_token_id=cfg.pad_token_id,
        do_layer_norm_before=cfg.do_layer_norm_before, word_embed_proj_dim=cfg.embed_dim,
        _remove_final_layer_norm=cfg.remove_final_layer_norm, enable_bias=cfg.enable_bias)
  d = hf.to_dict()
  d['architectures'] = [arch] if arch else None
  d['oqt_jax'] = variants
  return d


# ---------------------------------------------------------------- tensor I/O --------------
def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:  # pragma: no cover - torch is a test-only dependency
    raise CheckpointError(f'{path}: reading pytorch_model.bin needs torch (pip install torch); '
                          'safetensors checkpoints need no torch') from e
  sd = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  with safe_open(path, framework='numpy') as f:
    for k in f.keys():
      out[k] = f.get_tensor(k)
  return out


def read_state_dict(ckpt_dir: str) -> dict[str, np.ndarray]:
  """All tensors of an HF checkpoint dir (single file or sharded with an index)."""
  for index, reader in (('model.safetensors.index.json', _read_safetensors),
                        ('pytorch_model.bin.index.json', _read_torch_bin)):
    p = os.path.join(ckpt_dir, index)
    if os.path.exists(p):
      with open(p) as fh:
        files = sorted(set(json.load(fh)['weight_map'].values()))
      sd = {}
      for f in files:
        sd.update(reader(os.path.join(ckpt_dir, f)))
      return sd
  for name, reader in (('model.safetensors', _read_safetensors),
                       ('pytorch_model.bin', _read_torch_bin)):
    p = os.path.join(ckpt_dir, name)
    if os.path.exists(p):
      try:
        return reader(p)
      except CheckpointError:
        raise
      except Exception as e:
        raise CheckpointError(f'{p}: cannot be read ({type(e).__name__}: {e})') from e
  raise CheckpointError(f'{ckpt_dir}: no model.safetensors or pytorch_model.bin found')


def _resolve(path: str) -> str:
  path = os.fspath(path)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise CheckpointError(f'{path}: expected an HF checkpoint directory, found a file')
  why = hub.unreachable_name(path)
  if why:   # decided at once: no download attempt (and no retries) that cannot succeed
    raise CheckpointError(f'{path}: {why}')
  try:  # a hub name: real loading code, needs network
    from huggingface_hub import snapshot_download
    return snapshot_download(path, allow_patterns=['*.json', '*.safetensors', '*.bin', '*.txt',
                                                   '*.model'])
  except Exception as e:
    raise CheckpointError(f'{path}: not a local directory and not downloadable from the hub '
                          f'({type(e).__name__})') from e


def _normalise_keys(sd: dict) -> dict:
  """Checkpoint names -> base-model names: drop the 'bert.' / 'model.' prefix of task models
  and rename old LayerNorm.gamma/beta, so every head layout maps to the same keys."""
  out = {}
  for k, v in sd.items():
    k = k.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias')
    for pre in ('bert.', 'model.'):
      if k.startswith(pre):
        k = k[len(pre):]
    out[k] = v
  return out


def _set(tree: dict, path: tuple, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for p in path:
    tree = tree[p]
  return tree


def _is_optional(path: tuple, cfg: mcfg.ModelConfig, ckpt_head: str) -> bool:
  if 'gate' in path or path[-1] == 'sink':
    return True
  head_params = {'pooler', 'classifier', 'mlm_transform', 'mlm_ln', 'mlm_bias'}
  return path[0] in head_params and cfg.resolved_head != ckpt_head


# ---------------------------------------------------------------- original gates ----------
ORIGINAL_GATE_RE = re.compile(r'^.*\.(?:attention\.self|self_attn)\.alpha(?:\..*)?$')


def _gate_prefixes(cfg: mcfg.ModelConfig):
  for i in range(cfg.num_layers):
    yield (f'encoder.layer.{i}.attention.self' if cfg.model_type == 'bert'
           else f'decoder.layers.{i}.self_attn')


def convert_original_gates(sd: dict, cfg: mcfg.ModelConfig, where: str = '') -> list[str]:
  """Adds this package's gate tensors ('<prefix>.gate.*') to the normalised state dict `sd`
  from the original PyTorch code's ('<prefix>.alpha*'); returns the original names used.

  CheckpointError if gate tensors are present but cfg has no gate, or if a layer's gate
  tensors do not form the configured gate type (naming the missing tensor).
  """
  found = sorted(k for k in sd if ORIGINAL_GATE_RE.match(k))
  if not found:
    return []
  if cfg.gate == 'none':
    raise CheckpointError(
        f'{where}: the checkpoint has attention-gate tensors ({found[0]}, ...) but model.gate='
        "'none': load it with its gate, e.g. gate='conditional_per_token' (+ gate_mlp=True for "
        "alpha.<h>.0.*, gate_linear_all_features=True for alpha.weight; "
        "'unconditional_per_head' for alpha)")
  h = cfg.num_heads
  used = []

  def take(name):
    if name not in sd:
      raise CheckpointError(f'{where}: tensor {name!r} missing from the checkpoint (needed for '
                            f'the {cfg.gate} gate{" MLP" if cfg.gate_mlp else ""})')
    used.append(name)
    return np.asarray(sd[name], np.float32)

  for pre in _gate_prefixes(cfg):
    a, g = pre + '.alpha', pre + '.gate.'
    if not any(k == a or k.startswith(a + '.') for k in found):
      continue      # no gate in this layer: the usual missing-tensor rules apply
    heads = lambda fmt, f: np.stack([f(take(fmt.format(a, i))) for i in range(h)])
    if cfg.gate == 'unconditional_per_head':
      sd[g + 'alpha'] = take(a).reshape(-1)
    elif cfg.gate_linear_all_features:          # Linear(D -> H)
      sd[g + 'kernel'] = take(a + '.weight').T
      sd[g + 'bias'] = take(a + '.bias')
    elif cfg.gate_mlp:                          # per head Linear(d, d/4) -> ReLU -> Linear(d/4, 1)
      sd[g + 'kernel1'] = heads('{}.{}.0.weight', lambda w: w.T)
      sd[g + 'bias1'] = heads('{}.{}.0.bias', lambda b: b)
      sd[g + 'kernel2'] = heads('{}.{}.2.weight', lambda w: w.reshape(-1))
      sd[g + 'bias2'] = heads('{}.{}.2.bias', lambda b: b.reshape(()))
    else:                                       # per head Linear(d, 1)
      sd[g + 'kernel'] = heads('{}.{}.weight', lambda w: w.reshape(-1))
      sd[g + 'bias'] = heads('{}.{}.bias', lambda b: b.reshape(()))
  return used


def export_warning(cfg: mcfg.ModelConfig) -> str | None:
  """The warning an HF export of a gated / clipped model carries (None for vanilla models)."""
  what = []
  if cfg.gate != 'none':
    what.append(f'gates ({cfg.gate})')
  gamma, zeta = cfg.clip_gamma_zeta
  if (gamma, zeta) != (0.0, 1.0):
    what.append(f'clipped softmax (gamma={gamma:g}, zeta={zeta:g})')
  if cfg.norm == 'ssnorm':
    return ('transformers cannot load this model: its norms are single-scale RMSNorms (one '
            'scalar weight each, no bias). Use oqt_jax (hf.load).')
  if not what:
    return None
  return (f'transformers will load this model WITHOUT its {" and ".join(what)}: its '
          'from_pretrained ignores them and computes a different function. Use oqt_jax '
          '(hf.load; models.generate or eval.py --prompt for text generation).')


# ---------------------------------------------------------------- public API --------------
def load(path, *, rng=None, **overrides) -> tuple[nn.Module, dict]:
  """Load an HF BERT/OPT checkpoint dir (or hub name) as (Flax model, {'params': ...}).

  overrides: any ModelConfig field, e.g. softmax='clipped(-.025:1)', alpha=12,
  gate='conditional_per_token', gate_mlp=True, gate_init=0.25, fine_tuning=True, head='cls',
  num_labels=3, dtype='bfloat16'.
  """
  ckpt_dir = _resolve(path)
  cfg_path = os.path.join(ckpt_dir, 'config.json')
  try:
    with open(cfg_path) as fh:
      hf_cfg = json.load(fh)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f'{cfg_path}: cannot be read ({type(e).__name__})') from e
  try:
    ckpt_head = config_from_hf(hf_cfg).resolved_head
  except CheckpointError as e:   # name the file, not just 'config.json'
    raise CheckpointError(str(e).replace('config.json:', f'{cfg_path}:', 1)) from None
  cfg = config_from_hf(hf_cfg, **overrides)
  if cfg.model_type == 'opt' and cfg.resolved_head not in ('clm', 'none'):
    raise CheckpointError(f'{ckpt_dir}: an OPT checkpoint, asked for a {cfg.resolved_head!r} '
                          "head: OPT models have 'clm' / 'none' heads here (a classifier needs "
                          'a BERT checkpoint)')
  model = (Bert if cfg.model_type == 'bert' else Opt)(cfg)
  sd = _normalise_keys(read_state_dict(ckpt_dir))
  original_gates = convert_original_gates(sd, cfg, ckpt_dir)
  # A gate the checkpoint's own config declares must be in it; a gate switched on at load
  # time (for fine-tuning) starts fresh.
  declared_gate = (hf_cfg.get('oqt_jax') or {}).get('gate', 'none') not in ('none', None)

  rng = jax.random.PRNGKey(0) if rng is None else rng
  ids = jnp.zeros((1, 4), jnp.int32)
  init_fn = lambda r: nn.meta.unbox(model.init({'params': r, 'dropout': r}, ids)['params'])
  shapes = jax.eval_shape(init_fn, rng)
  params, missing, used = {}, [], set(original_gates)
  missing_gates = []
  for fpath, key, transpose in param_map(cfg):
    name = _hf_name(cfg, key, prefixed=False)
    expect = _get(shapes, fpath).shape
    if name not in sd:
      if 'gate' in fpath and declared_gate:
        missing_gates.append(name)
        continue
      if _is_optional(fpath, cfg, ckpt_head):
        missing.append(fpath)
        continue
      raise CheckpointError(f'{ckpt_dir}: tensor {name!r} missing from the checkpoint '
                            f'(needed for {"/".join(fpath)})')
    arr = np.asarray(sd[name], dtype=np.float32)
    if transpose:
      arr = arr.T
    if arr.shape != expect:
      raise CheckpointError(f'{ckpt_dir}: tensor {name!r} has shape {tuple(sd[name].shape)}, '
                            f'the model expects {expect if not transpose else expect[::-1]}')
    _set(params, fpath, jnp.asarray(arr))
    used.add(name)
  if missing_gates:
    raise CheckpointError(
        f'{ckpt_dir}: config.json declares gate={cfg.gate!r} but the checkpoint lacks its '
        f'tensors ({len(missing_gates)} missing: {", ".join(missing_gates[:3])}'
        f'{", ..." if len(missing_gates) > 3 else ""})')
  if missing:
    fresh = jax.jit(init_fn)(rng)
    for fpath in missing:
      _set(params, fpath, _get(fresh, fpath))
    log.info('initialised %d parameters not in the checkpoint: %s', len(missing),
             ', '.join('/'.join(p) for p in missing[:8]))
  unused = [k for k in sd if k not in used and not any(s in k for s in IGNORABLE)]
  if unused:   # a head replaced at load time (MLM -> classifier) drops its tensors: expected
    (log.info if cfg.resolved_head != ckpt_head else log.warning)(
        '%s: %d checkpoint tensors not used: %s', ckpt_dir, len(unused),
        ', '.join(sorted(unused)[:8]))
  return model, {'params': params}


def save(model: nn.Module, variables: dict, out_dir, tokenizer=None) -> str:
  """Write an HF checkpoint dir (config.json + model.safetensors [+ tokenizer files])."""
  from safetensors.numpy import save_file
  cfg: mcfg.ModelConfig = model.cfg
  params = nn.meta.unbox(variables['params'] if 'params' in variables else variables)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  tensors = {}
  for fpath, key, transpose in param_map(cfg):
    try:
      arr = np.asarray(jax.device_get(_get(params, fpath)), dtype=np.float32)
    except KeyError as e:
      raise CheckpointError(f'parameter {"/".join(fpath)} missing from the variables') from e
    arr = arr.T if transpose else arr
    tensors[_hf_name(cfg, key)] = np.ascontiguousarray(arr).reshape(arr.shape)   # 0-d stays 0-d
  save_file(tensors, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(out_dir, 'config.json'), 'w') as fh:
    json.dump(config_to_hf(cfg), fh, indent=2, sort_keys=True)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  warning = export_warning(cfg)
  if warning:
    print(f'WARNING: {out_dir}: {warning}', file=sys.stderr, flush=True)
  return out_dir


__all__ = ['load', 'save', 'config_from_hf', 'config_to_hf', 'convert_original_gates',
           'export_warning', 'param_map', 'read_state_dict', 'POSITION_OFFSET']
