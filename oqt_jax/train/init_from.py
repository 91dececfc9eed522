"""Fine-tuning: start from `config.init_from`, and epochs -> steps.

`config.init_from` names the pretrained model:

* an HF checkpoint dir (config.json + model.safetensors / pytorch_model.bin) or a hub name
  ('bert-base-uncased'; needs the network or the HF cache);
* a train.py workdir: its hf/ export, else its newest Orbax checkpoint (written out once as an
  HF dir, WORKDIR_OF_THIS_RUN/init_hf, and loaded from there).

The architecture comes from the checkpoint; the head (model.head, e.g. 'cls' with the GLUE
task's num_labels), dropout, compute dtype and every attention-variant field the config sets
to a non-default value (softmax, gate, fine_tuning, ...) come from the config: a vanilla
checkpoint fine-tunes with gates added by `model.gate=conditional_per_token
model.fine_tuning=True`, parameters the checkpoint lacks (gates, pooler, classifier) are
freshly initialised (oqt_jax.models.hf.load). The tokenizer is the checkpoint's (its dir's
tokenizer files, the workdir's tokenizer/ folder, or the hub name) unless data.tokenizer is set.

`num_train_epochs > 0` sets num_train_steps = ceil(epochs x train examples / examples per
step); `warmup_ratio >= 0` sets warmup_steps = round(ratio x num_train_steps). Both are
resolved when the train split is known and written to the run's config.json.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Optional

import jax

from oqt_jax import models
from oqt_jax.data.glue import glue_task_info
from oqt_jax.errors import CheckpointError, ConfigError
from oqt_jax.models import hf
from oqt_jax.models.hf import VARIANT_FIELDS
from oqt_jax.train.checkpoint import load_orbax

HF_DIR = 'hf'
CKPT_DIR = 'checkpoints'
TOKENIZER_DIR = 'tokenizer'
INIT_HF_DIR = 'init_hf'
TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt', 'tokenizer_config.json')
TRAINING_FIELDS = ('hidden_dropout', 'attention_dropout', 'dtype')


def _info(msg: str):
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def _has_tokenizer(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)


def resolve(init_from: str, workdir: Optional[str] = None, config=None
            ) -> tuple[str, Optional[str]]:
  """(HF dir or hub name to load, tokenizer dir / name or None) for `init_from`."""
  path = os.path.expanduser(init_from)
  if not os.path.isdir(path):
    if os.path.exists(path) or path.startswith(('.', '/', '~')) or path.count('/') > 1:
      raise ConfigError(f"init_from='{init_from}': not a directory (expected an HF checkpoint "
                        'dir, a hub name or a train.py workdir)')
    return init_from, init_from            # a hub name: model and tokenizer from the hub
  is_workdir = any(os.path.isdir(os.path.join(path, d)) for d in (HF_DIR, CKPT_DIR))
  if not is_workdir:
    if not os.path.exists(os.path.join(path, 'config.json')):
      raise ConfigError(f"init_from='{init_from}': no config.json, hf/ or checkpoints/ in it")
    return path, (path if _has_tokenizer(path) else None)
  tok_dir = os.path.join(path, TOKENIZER_DIR)
  tok = tok_dir if _has_tokenizer(tok_dir) else None
  hf_dir = os.path.join(path, HF_DIR)
  if os.path.exists(os.path.join(hf_dir, 'config.json')):
    return hf_dir, (hf_dir if _has_tokenizer(hf_dir) else tok)
  if os.path.isdir(os.path.join(path, CKPT_DIR)):
    if workdir is None or config is None:
      raise ConfigError(f"init_from='{init_from}': a workdir without hf/; pass a workdir to "
                        'convert its newest checkpoint')
    model, variables = load_orbax(config, path)
    out = os.path.join(workdir, INIT_HF_DIR)
    if jax.process_index() == 0:
      hf.save(model, variables, out)
    _info(f'init_from: newest checkpoint of {path} written to {out}')
    return out, tok
  raise ConfigError(f"init_from='{init_from}': a workdir with neither hf/config.json nor a "
                    'checkpoint')


def load_overrides(config) -> dict[str, Any]:
  """hf.load overrides from config.model: head / num_labels, training fields, and the
  attention-variant fields set to non-default values."""
  m = config.model
  default = models.ModelConfig()
  ov: dict[str, Any] = {f: m[f] for f in TRAINING_FIELDS if f in m}
  head = m.get('head', 'auto')
  if config.data.get('source', '') == 'glue':
    head = 'cls'
    ov['num_labels'] = glue_task_info(config.data.glue_task).num_labels
  elif head == 'cls':
    ov['num_labels'] = m.get('num_labels', 2)
  if head != 'auto':
    ov['head'] = head
  ov.update({f: m[f] for f in VARIANT_FIELDS if f in m and m[f] != getattr(default, f)})
  return ov


def load_init(config, workdir: str):
  """(config with model fields / tokenizer from the checkpoint, params) for config.init_from."""
  init = config.init_from
  path, tok = resolve(init, workdir, config)
  ov = load_overrides(config)
  model, variables = hf.load(path, **ov)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for f in dataclasses.fields(models.ModelConfig):
      if f.name in config.model:
        config.model[f.name] = getattr(model.cfg, f.name)
    if not config.data.get('tokenizer', ''):
      if tok is None:
        raise ConfigError(f"init_from='{init}': no tokenizer found next to the checkpoint; "
                          'set data.tokenizer')
      config.data.tokenizer = tok
  _info(f'init_from {path}: {model.cfg.model_type} {model.cfg.num_layers}L '
        f'{model.cfg.hidden_size}H, head {model.cfg.resolved_head}'
        + (f' ({model.cfg.num_labels} labels)' if model.cfg.resolved_head == 'cls' else '')
        + f'; tokenizer {config.data.tokenizer}')
  return config, variables['params']


def with_params(state, params, shardings):
  """`state` with these parameters (placed in `shardings.params`) and a fresh optimizer state
  (in `shardings.opt_state`); the trees must match. Only the parameters and the optimizer
  state are replaced: the rest of `state` (step, RNG, and a QAT run's range state, added after
  this call) is left as it is, so `shardings` may describe a larger state than `state`."""
  want = jax.tree_util.tree_structure(state.params)
  got = jax.tree_util.tree_structure(params)
  if want != got:
    a = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    b = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    raise CheckpointError(f'init_from: parameters do not match the model (first differences: '
                          f'{sorted(a ^ b)[:3]})')
  params = jax.tree.map(lambda x, s: x.astype(s.dtype), params, state.params)

  tx = state.tx

  def put(old, p):   # `old` (the freshly initialised params) is donated: its buffers are reused
    del old
    return p, tx.init(p)
  new_params, opt_state = jax.jit(put, out_shardings=(shardings.params, shardings.opt_state),
                                  donate_argnums=(0,))(state.params, params)
  return state.replace(params=new_params, opt_state=opt_state)


def resolve_schedule(config, num_examples: int, examples_per_step: int):
  """Config with num_train_steps from num_train_epochs (> 0) and warmup_steps from
  warmup_ratio (>= 0); unchanged otherwise."""
  epochs = float(config.get('num_train_epochs', -1) or -1)
  ratio = float(config.get('warmup_ratio', -1.0))
  if epochs <= 0 and ratio < 0:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if epochs > 0:
      per_epoch = math.ceil(num_examples / examples_per_step)
      config.num_train_steps = max(1, math.ceil(epochs * per_epoch))
      _info(f'num_train_epochs={epochs:g}: {num_examples} examples / {examples_per_step} per '
            f'step = {per_epoch} steps an epoch -> num_train_steps={config.num_train_steps}')
    if ratio >= 0:
      config.warmup_steps = int(round(ratio * config.num_train_steps))
      _info(f'warmup_ratio={ratio:g} -> warmup_steps={config.warmup_steps}')
  return config
