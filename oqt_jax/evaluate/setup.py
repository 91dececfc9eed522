"""What an evaluation runs on: the model (a workdir's newest checkpoint or --hf_model), the
config (eval.py's rules for --config, recorded runs and checkpoint dirs), the data.

  model, variables, source = load_model(config, workdir, hf_model)
  config = sync_config(config, model, source)            # model fields from the checkpoint
  val, cal = datasets(config, workdir, calib=True)       # validation + calibration splits
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

import ml_collections

from oqt_jax import data, models
from oqt_jax.data.tokenizer import check_tokenizer
from oqt_jax.errors import CheckpointError, ConfigError, DataError
from oqt_jax.models import hf
from oqt_jax.models.hf import VARIANT_FIELDS
from oqt_jax.train.checkpoint import load_orbax


def info(msg: str):
  """A progress / note line on stderr (stdout carries the tables)."""
  print(msg, file=sys.stderr, flush=True)


def plural(n: int, word: str) -> str:
  return f'{n} {word}' if n == 1 else f'{n} {word}es' if word.endswith(('ch', 'sh', 's')) \
      else f'{n} {word}s'


HF_DIR = 'hf'


CKPT_DIR = 'checkpoints'


SYNCED_MODEL_FIELDS = ('model_type', 'head', 'vocab_size', 'pad_token_id',
                       'max_position_embeddings', 'num_layers', 'hidden_size')


TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt', 'tokenizer_config.json')


def _newest_step_dir(ckpt_dir: str) -> Optional[str]:
  if not os.path.isdir(ckpt_dir):
    return None
  steps = [d for d in os.listdir(ckpt_dir) if d.isdigit()]
  if not steps:
    return None
  return os.path.join(ckpt_dir, max(steps, key=int))


def _variant_overrides(config, hf_path: str) -> dict:
  """Attention-variant fields of config.model for checkpoints that do not record them."""
  try:
    with open(os.path.join(hf_path, 'config.json')) as fh:
      hf_cfg = json.load(fh)
  except (OSError, json.JSONDecodeError):
    return {}
  if 'oqt_jax' in hf_cfg:
    return {}
  default = models.ModelConfig()
  out = {f: config.model[f] for f in VARIANT_FIELDS
         if f in config.model and config.model[f] != getattr(default, f)}
  # The alpha form's T is the config's whatever its value (a foreign OPT would otherwise get
  # its block size 512 whenever the config's T equals the generic default).
  if 'softmax_T' in config.model and (float(config.model.get('alpha', -1.0) or -1.0) > 0
                                      or config.model.get('softmax', 'vanilla') != 'vanilla'):
    out['softmax_T'] = config.model.softmax_T
  return out


def load_model(config, workdir: Optional[str], hf_model: Optional[str] = None):
  """(model, variables, source path) of the run to evaluate."""
  if hf_model:
    path = os.path.expanduser(hf_model)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, 'config.json')):
      raise CheckpointError(f'--hf_model={hf_model}: no config.json in {path}')
    if not os.path.exists(path) and (os.path.isabs(path) or path.startswith('.')):
      raise CheckpointError(f'--hf_model={hf_model}: no such directory')
    return (*hf.load(path, **_variant_overrides(config, path)), path)
  if not workdir:
    raise CheckpointError('no model: pass --workdir of a training run or --hf_model PATH')
  hf_dir = os.path.join(workdir, HF_DIR)
  step_dir = _newest_step_dir(os.path.join(workdir, CKPT_DIR))
  hf_ok = os.path.exists(os.path.join(hf_dir, 'config.json'))
  if hf_ok and (step_dir is None or os.path.getmtime(os.path.join(hf_dir, 'config.json'))
                >= os.path.getmtime(step_dir)):
    return (*hf.load(hf_dir, **_variant_overrides(config, hf_dir)), hf_dir)
  if step_dir is not None:
    model, variables = load_orbax(config, workdir)
    return model, variables, step_dir
  raise CheckpointError(f'{workdir}: no checkpoint to evaluate (neither {hf_dir} nor '
                        f'{os.path.join(workdir, CKPT_DIR)}/<step>); pass --hf_model PATH')


def _read_json(path: str) -> Optional[dict]:
  try:
    with open(path) as fh:
      d = json.load(fh)
  except (OSError, json.JSONDecodeError):
    return None
  return d if isinstance(d, dict) else None


def _merge(dst: ml_collections.ConfigDict, src: dict, prefix: str, keep: Sequence[str]):
  """dst updated from src (recursively), except the dotted fields in `keep` (and their
  sections) and fields dst does not know."""
  for k, v in src.items():
    path = f'{prefix}{k}'
    if path in keep or k not in dst:
      continue
    if isinstance(dst[k], ml_collections.ConfigDict):
      if isinstance(v, dict):
        _merge(dst[k], v, path + '.', keep)
      continue
    if isinstance(v, list):
      v = tuple(v)
    try:
      dst[k] = v
    except TypeError:   # a recorded value of another type than the default: leave it
      pass


def default_config(model_type: str = 'bert') -> ml_collections.ConfigDict:
  """The config of an evaluation without --config: the paper recipe of the model type (its
  quantization defaults), data from the embedded corpus."""
  try:
    from configs import recipes
  except ImportError:
    raise ConfigError('--config: needed (configs/ is not importable from here)') from None
  c = recipes.opt_125m() if model_type == 'opt' else recipes.bert_base()
  with c.unlocked():
    c.data.source = 'embedded'
  return c


def eval_config(config: Optional[ml_collections.ConfigDict], workdir: Optional[str],
                hf_model: Optional[str] = None,
                explicit: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config eval.py evaluates with.

  - no --config: with --hf_model, the recipe of the checkpoint's model type on the embedded
    corpus (the model itself comes from the checkpoint); else the config the run recorded in
    WORKDIR/config.json.
  - the data settings the run recorded in WORKDIR/config.json (source, files, tokenizer,
    lengths, ...) replace the config file's, except the fields given on the command line
    (`explicit`: dotted names such as 'data.files'); not with --hf_model.
  - an --hf_model dir that holds a tokenizer: data.tokenizer is that dir unless
    'data.tokenizer' is explicit.
  """
  explicit = tuple(explicit)
  recorded = _read_json(os.path.join(workdir, 'config.json')) if workdir and not hf_model \
      else None
  if config is None:
    if hf_model:
      hf_cfg = _read_json(os.path.join(os.path.expanduser(hf_model), 'config.json')) or {}
      config = default_config(hf_cfg.get('model_type', ''))
      n_pos = hf_cfg.get('max_position_embeddings')
      with config.unlocked():
        for f in ('max_seq_length', 'block_size'):
          if isinstance(n_pos, int) and 0 < n_pos < config.data[f]:
            config.data[f] = n_pos
    elif recorded is not None:
      config = default_config(recorded.get('model', {}).get('model_type', 'bert'))
      _merge(config, recorded, '', explicit)
    else:
      raise ConfigError('--config: needed (no --hf_model, and no config.json in '
                        f'--workdir={workdir})')
  else:
    config = config.copy_and_resolve_references()
  with config.unlocked():
    if recorded is not None and isinstance(recorded.get('data'), dict):
      _merge(config.data, recorded['data'], 'data.', explicit)
    if hf_model and 'data.tokenizer' not in explicit:
      path = os.path.expanduser(hf_model)
      if any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        config.data.tokenizer = path
  return config


def explicit_fields(args: Sequence[str], name: str = 'config') -> list[str]:
  """The dotted config fields set on a command line (--config.data.files=X -> 'data.files')."""
  prefix = f'--{name}.'
  return [a[len(prefix):].split('=', 1)[0] for a in args if a.startswith(prefix)]


def sync_config(config, model, model_path: Optional[str]):
  """A copy of config whose model fields agree with the loaded model (and its tokenizer)."""
  config = config.copy_and_resolve_references()
  asked = config.model.get('model_type', '')
  if asked and asked != model.cfg.model_type:
    info(f'note: the config is for {asked} models, {model_path} is {model.cfg.model_type}: '
          'the model settings come from the checkpoint')
  with config.unlocked():
    for f in SYNCED_MODEL_FIELDS:
      setattr(config.model, f, getattr(model.cfg, f))
    n_pos = int(model.cfg.max_position_embeddings)
    if asked != model.cfg.model_type:   # the other type's sequence length
      for f in ('max_seq_length', 'block_size'):
        if int(config.data.get(f, 0)) > n_pos:
          config.data[f] = n_pos
    if (model_path and os.path.isdir(model_path) and not config.data.get('tokenizer', '')
        and any(os.path.exists(os.path.join(model_path, f)) for f in TOKENIZER_FILES)):
      config.data.tokenizer = model_path
  return config


def run_tokenizer(config, workdir):
  """No tokenizer beside the model (an Orbax checkpoint of a fine-tuning run): use the one the
  run recorded in workdir/config.json (e.g. its init_from's), rather than training one."""
  if config.data.get('tokenizer', '') or not workdir:
    return config
  recorded = (_read_json(os.path.join(workdir, 'config.json')) or {}).get('data')
  tok = recorded.get('tokenizer', '') if isinstance(recorded, dict) else ''
  if tok:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.tokenizer = tok
  return config


def datasets(config, workdir, calib: bool):
  tok = data.get_tokenizer(config, workdir)
  check_tokenizer(tok, f"data.tokenizer='{config.data.get('tokenizer', '') or workdir}'",
                  config.model.get('vocab_size'))
  val = data.build_dataset(config, tok, 'validation', workdir)
  cal = None
  if calib:
    try:
      cal = data.build_dataset(config, tok, 'train', workdir)
    except DataError as e:
      info(f'calibration: the train split is unusable ({e}); using validation batches')
      cal = val
  return val, cal


def calibration_batches(ds, batch_size: int, num: int):
  """`num` training batches (the training sampler, steps 0..num-1)."""
  if hasattr(ds, 'batch'):
    for step in range(num):
      yield ds.batch(step, batch_size)
  else:
    yield from ds.eval_batches(batch_size, num)
