"""`evaluate_run(config, workdir, ...)`: what eval.py does, as a library call.

Model: --hf_model PATH, else the newest of workdir/hf (the training loop's HF export) and
workdir/checkpoints (Orbax; parameters only). Data: the config's source, validation split
(calibration batches from the train split). Writes workdir/eval_metrics.json and PNG plots.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from oqt_jax import data, models, quant
from oqt_jax.config import prepare_workdir
from oqt_jax.data.tokenizer import check_tokenizer
from oqt_jax.errors import CheckpointError, ConfigError, DataError
from oqt_jax.evaluate import outliers, plots
from oqt_jax.models import hf
from oqt_jax.models.generate import check_generation
from oqt_jax.models.hf import VARIANT_FIELDS
from oqt_jax.quant import methods, weight_int8
from oqt_jax.quant import points as P
from oqt_jax.quant.methods import qat
from oqt_jax.train import glue_eval
from oqt_jax.train.checkpoint import load_orbax
from oqt_jax.train.guards import check_batch, nonfinite_leaves

log = logging.getLogger(__name__)

HF_DIR = 'hf'
CKPT_DIR = 'checkpoints'
METRICS_FILE = 'eval_metrics.json'
PER_LAYER_PNG = 'eval_per_layer.png'
HISTOGRAM_PNG = 'eval_histogram.png'
SYNCED_MODEL_FIELDS = ('model_type', 'head', 'vocab_size', 'pad_token_id',
                       'max_position_embeddings', 'num_layers', 'hidden_size')
TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt', 'tokenizer_config.json')
OUT_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')
# Methods that quantize each batch as it comes (nothing calibrated beforehand).
NO_CALIBRATION = frozenset({'fp', 'llm_int8', 'weight_only', 'weight_int8', 'dynamic'})


def _info(msg: str):
  print(msg, file=sys.stderr, flush=True)


# ---- model loading ---------------------------------------------------------------------------
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


# ---- the configuration of an evaluation -------------------------------------------------------
def _plural(n: int, word: str) -> str:
  return f'{n} {word}' if n == 1 else f'{n} {word}es' if word.endswith(('ch', 'sh', 's')) \
      else f'{n} {word}s'


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


# ---- data ------------------------------------------------------------------------------------
def sync_config(config, model, model_path: Optional[str]):
  """A copy of config whose model fields agree with the loaded model (and its tokenizer)."""
  config = config.copy_and_resolve_references()
  asked = config.model.get('model_type', '')
  if asked and asked != model.cfg.model_type:
    _info(f'note: the config is for {asked} models, {model_path} is {model.cfg.model_type}: '
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


def _run_tokenizer(config, workdir):
  """No tokenizer beside the model (an Orbax checkpoint of a fine-tuning run): use the one the
  run recorded in workdir/config.json (e.g. its init_from's), rather than training one."""
  if config.data.get('tokenizer', '') or not workdir:
    return config
  try:
    with open(os.path.join(workdir, 'config.json')) as fh:
      tok = json.load(fh).get('data', {}).get('tokenizer', '')
  except (OSError, json.JSONDecodeError, AttributeError):
    return config
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
      _info(f'calibration: the train split is unusable ({e}); using validation batches')
      cal = val
  return val, cal


def calibration_batches(ds, batch_size: int, num: int):
  """`num` training batches (the training sampler, steps 0..num-1)."""
  if hasattr(ds, 'batch'):
    for step in range(num):
      yield ds.batch(step, batch_size)
  else:
    yield from ds.eval_batches(batch_size, num)


# ---- checks before any evaluation ------------------------------------------------------------
def model_points(model_type: str) -> tuple[frozenset, frozenset]:
  """(per-layer, global) point names of quant_dict keys for one model type."""
  layer = set(P.LAYER_ACTS[model_type]) | {'L'}
  layer |= {'w' + a for a in P.LAYER_ACTS[model_type] if a in P.WEIGHTED}
  glob = set(P.GLOBAL_ACTS[model_type]) | set(P.TABLES[model_type])
  glob |= {'w' + a for a in P.GLOBAL_ACTS[model_type] if a in P.WEIGHTED}
  return frozenset(layer), frozenset(glob)


def check_quant_points(qcfg, model_type: str, num_layers: Optional[int] = None) -> None:
  """quant_dict keys exist for this model type (and layer indices < num_layers); the
  message lists only this model's points."""
  import ast
  spec = qcfg.get('quant_dict', '') if hasattr(qcfg, 'get') else ''
  if model_type not in P.LAYER_ACTS or not spec:
    return
  try:
    d = ast.literal_eval(spec.strip()) if isinstance(spec, str) else spec
    d = d.to_dict() if hasattr(d, 'to_dict') else dict(d)
  except Exception:   # not a dict: validate_quant_config says so
    return
  layer, glob = model_points(model_type)
  field = 'quant.quant_dict'
  for key in d:
    m = P.KEY_RE.match(str(key))
    base, idx = (m.group(1), m.group(2)) if m else (str(key), None)
    if base in layer:
      if idx is not None and num_layers is not None and int(idx) >= num_layers:
        raise ConfigError(f'{field}: point {key!r}: the {model_type} model has {num_layers} '
                          f'layers (0..{num_layers - 1})')
    elif base in glob:
      if idx is not None:
        raise ConfigError(f'{field}: point {key!r}: {base!r} is not a per-layer point')
    else:
      raise ConfigError(f'{field}: unknown point {key!r} for {model_type} (known: '
                        f'{", ".join(sorted(layer | glob))}, per-layer ones with an optional '
                        'layer index)')


def check_quant_for_model(config, model, variables) -> None:
  """Settings that can only fail on this model (unknown points, PEG groups that do not divide
  a point's width) as ConfigError now, before any evaluation: the calibration's first pass
  is traced abstractly (no computation)."""
  check_quant_points(config.quant, model.cfg.model_type, model.cfg.num_layers)
  quant.validate_quant_config(config)
  try:
    hooks = quant.hooks(config.quant, model.cfg)
    init_model = model.clone(quant=hooks.with_mode('init'))
  except ConfigError:
    raise
  except Exception:   # calibration reports anything else itself
    return
  ids = jax.ShapeDtypeStruct((1, 8), np.int32)
  inputs = {'input_ids': ids, 'attention_mask': ids}
  params = {k: v for k, v in dict(variables).items() if k == 'params'}
  try:
    jax.eval_shape(lambda v, i: init_model.apply(v, **i, mutable=['quant']), params, inputs)
  except ConfigError:
    raise
  except Exception:
    return


def checked(batches, model, where: str):
  """`batches`, each checked first (token ids inside the vocabulary, sequences no longer
  than the position table): a DataError instead of NaN from an out-of-range lookup."""
  for i, b in enumerate(batches):
    check_batch(b, model.cfg.vocab_size, model.cfg.max_position_embeddings, f'{where} {i}')
    yield b


def check_finite_params(variables, source) -> None:
  bad = nonfinite_leaves(variables.get('params', variables))
  if bad:
    raise CheckpointError(f'{source}: non-finite parameters ({bad[0]}; {len(bad)} array(s) '
                          'with NaN or Inf): nothing to evaluate')


def check_finite_metrics(metrics, source, what='model') -> None:
  """DataError when no token was evaluated; CheckpointError when the model's loss or
  activation statistics are NaN / Inf (never reported as numbers)."""
  loss = metrics.get('loss')
  if loss is not None and not metrics.get('num_tokens'):
    raise DataError('validation split: the evaluation batches have no valid (non-padding) '
                    'tokens')
  if loss is not None and not math.isfinite(loss):
    raise CheckpointError(f'{source}: the {what} gives a non-finite evaluation loss ({loss}): '
                          'its activations overflow on this data')
  for k in ('max_inf_norm', 'max_inf_norm_any'):
    v = metrics.get(k)
    if isinstance(v, float) and not math.isfinite(v):
      raise CheckpointError(f'{source}: the {what} has non-finite activation statistics '
                            f'({k} {v})')


# ---- GLUE ------------------------------------------------------------------------------------
def glue_datasets(config, workdir, val) -> dict:
  """{split: dataset} of the dev sets to score for a GLUE config ({} otherwise):
  'validation' (MNLI: matched) and, for MNLI, 'validation_mismatched'."""
  if config.data.get('source', '') != 'glue':
    return {}
  sets = {'validation': val}
  if config.data.glue_task == 'mnli':
    tok = data.get_tokenizer(config, workdir)
    sets['validation_mismatched'] = data.build_dataset(config, tok, 'validation_mismatched',
                                                       workdir)
  return sets


def glue_report(model, variables, config, sets: dict, batch_size: int, *,
                progress: bool = False, prefix: str = '') -> dict:
  """The GLUE metrics of (model, variables) on each dev set (whole sets), printed; the
  'validation' figures at the top level, other splits under their split name."""
  out: dict[str, Any] = {}
  for split, ds in sets.items():
    batches = ds.eval_batches(batch_size)
    if progress:
      from tqdm.auto import tqdm
      batches = tqdm(batches, total=ds.num_eval_batches(batch_size),
                     desc=f'{prefix}GLUE {split}', unit='batch')
    m = glue_eval.evaluate_glue(model, variables, config, batches)
    print(glue_eval.format_glue(m, prefix=f'{prefix}{split} '))
    if split == 'validation':
      out.update(m)
    else:
      out[split] = m
  return out


# ---- weight-only int8 --------------------------------------------------------------------------
def weight_only_sizes(variables, qvars) -> dict:
  return dict(model_bytes_fp=weight_int8.param_bytes(variables),
              model_bytes_int8=weight_int8.param_bytes(qvars))


def weight_only_report(variables, qvars) -> str:
  s = weight_only_sizes(variables, qvars)
  return (f"weight-only int8: model size {s['model_bytes_fp']:,} bytes -> "
          f"{s['model_bytes_int8']:,} bytes ({s['model_bytes_int8'] / s['model_bytes_fp']:.1%})")


# ---- the run ---------------------------------------------------------------------------------
def _nan_to_none(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None if math.isnan(x) else ('inf' if x > 0 else '-inf')
  if isinstance(x, dict):
    return {k: _nan_to_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_nan_to_none(v) for v in x]
  return x


def evaluate_run(config: ml_collections.ConfigDict, workdir: Optional[str], *,
                 quantize: bool = False, hf_model: Optional[str] = None,
                 num_batches: Optional[int] = None, batch_size: Optional[int] = None,
                 out_dir: Optional[str] = None, plots_on: bool = True,
                 progress: bool = True, explicit_quant: Sequence[str] = (),
                 out: Optional[str] = None) -> dict[str, Any]:
  """Evaluate FP (and with `quantize` the calibrated quantized model); write metrics + plots.

  Files: out_dir/eval_<NAME>.json, eval_<NAME>_per_layer.png, eval_<NAME>_histogram.png,
  NAME = `out` or one derived from what was evaluated ('fp', 'w8a8', 'w4a8_adaround',
  'w6a6_outlier_suppression', 'qat_w4a8', ...), so evaluations of one run do not overwrite
  each other; out_dir/eval_metrics.json is a copy of the newest.

  The quantized model comes from the method config.quant.method ('' = plain calibration;
  oqt_jax.quant.methods.names()); the method's preset (the original's bits, granularity,
  calibration samples) fills the quant fields not named in `explicit_quant`.
  """
  if out is not None and not OUT_NAME_RE.match(out):
    raise ConfigError(f'--out={out!r}: expected a name of letters, digits, ".", "_", "-" '
                      '(it names the files eval_NAME.json, ...)')
  for flag, v in (('--num_batches', num_batches), ('--batch_size', batch_size)):
    if v is not None and v < 1:
      raise ConfigError(f'{flag}={v}: must be >= 1')
  if quantize:
    if not hf_model:
      check_quant_points(config.quant, config.model.get('model_type', ''))
    quant.validate_quant_config(config)
  out_dir = out_dir or workdir
  if not out_dir:
    raise ConfigError('--workdir: needed to write eval_metrics.json (or give out_dir)')
  model, variables, source = load_model(config, workdir, hf_model)
  config = sync_config(config, model, source)
  config = _run_tokenizer(config, workdir)
  check_finite_params(variables, source)
  if quantize:
    check_quant_for_model(config, model, variables)
  out_dir = prepare_workdir(out_dir, field='--workdir')
  mtype = model.cfg.model_type
  bs = int(batch_size or config.get('eval_batch_size', 32))
  nb = int(num_batches or config.get('num_eval_batches', 50))
  val, cal = datasets(config, workdir, calib=quantize)
  if nb <= 0 and hasattr(val, 'num_eval_batches'):    # <= 0: the whole validation split
    nb = val.num_eval_batches(bs)
  nb = min(nb, val.num_eval_batches(bs)) if hasattr(val, 'num_eval_batches') else nb
  if nb < 1:
    raise DataError(f'validation split: no evaluation batch (the split is empty, or '
                    f'num_eval_batches={config.get("num_eval_batches")} is 0)')
  is_lm = model.cfg.resolved_head in ('mlm', 'clm')
  _info(f'evaluating {mtype} ({model.cfg.resolved_head}) from {source}: '
        f'{_plural(nb, "batch")} of {bs}')

  fp, fp_first = outliers.evaluate(model, variables, checked(val.eval_batches(bs, nb), model,
                                                            'validation batch'), num_batches=nb,
                                   progress=progress, desc='FP eval', keep_first=True)
  check_finite_metrics(fp, source)
  print(outliers.format_table(fp, mtype, title=f'FP: per-layer inf norm and kurtosis ({mtype})'))
  print(outliers.format_summary(fp, perplexity=is_lm))
  result: dict[str, Any] = dict(fp)
  result.update(model_path=source, model_type=mtype, head=model.cfg.resolved_head,
                num_batches=nb, batch_size=bs)
  glue_sets = glue_datasets(config, workdir, val)
  if glue_sets:
    result['glue'] = glue_report(model, variables, config, glue_sets, bs, progress=progress)

  q = q_first = None
  if quantize:
    method = config.quant.get('method', '')
    qcfg = methods.with_preset(config.quant, method, explicit_quant, batch_size=bs)
    quant.validate_quant_config(qcfg)
    calibrating = lambda n: _info(
        f'calibrating on {_plural(n, "batch")} (method={method or "calibrate"}'
        f'{", AdaRound" if qcfg.get("adaround", False) else ""}, W{qcfg.n_bits}A{qcfg.n_bits_act}'
        f', quant_setup={qcfg.quant_setup}, quant_dict={qcfg.quant_dict!r}, int8={qcfg.int8})')
    exported = None if qcfg.get('adaround', False) else qat.quantized_from_export(
        model, variables, source if os.path.isdir(str(source)) else None)
    if qcfg.get('weight_only', False):   # int8 weights, FP activations: no calibration
      qmodel, qvars = quant.weight_only(model, variables)
      _info(weight_only_report(variables, qvars))
    elif exported is not None:           # a QAT run: the quantizers it learned, no calibration
      asked, (qmodel, qvars, qcfg) = qcfg, exported
      _info(f'using the quantizers learned by QAT ({os.path.join(source, qat.STATE_FILE)}: '
            f'W{qcfg.n_bits}A{qcfg.n_bits_act}, quant_setup={qcfg.quant_setup}, '
            f'quant_dict={qcfg.quant_dict!r}); no calibration')
      ignored = [f'{k}={asked.get(k)!r}' for k in dict.fromkeys(explicit_quant)
                 if k in asked and k in qcfg and asked.get(k) != qcfg.get(k)]
      if ignored:
        _info(f'note: quant.{", quant.".join(ignored)} on the command line ignored: a QAT run '
              'is evaluated with the quantizers it learned')
    elif qcfg.get('adaround', False):   # AdaRound weights (calibration batches + samples)
      n_cal = max(int(qcfg.est_num_batches), -(-int(qcfg.adaround_samples) // bs))
      calibrating(n_cal)
      qmodel, qvars = quant.adaround(
          model, variables, checked(calibration_batches(cal, bs, n_cal), model,
                                    'calibration batch'), qcfg, progress=progress)
    else:
      if method in NO_CALIBRATION:
        _info(f'quantizing with {method} (no calibration: ranges from each batch)')
      else:
        calibrating(int(qcfg.est_num_batches))
      qmodel, qvars, _ = methods.run(
          method, model, variables,
          checked(calibration_batches(cal, bs, int(qcfg.est_num_batches)), model,
                  'calibration batch'), qcfg, progress=progress)
    q, q_first = outliers.evaluate(qmodel, qvars, checked(val.eval_batches(bs, nb), model,
                                                          'validation batch'), num_batches=nb,
                                   progress=progress, desc='quantized eval', keep_first=True)
    check_finite_metrics(q, source, what='quantized model')
    label = quant_label(qcfg, method, qat=exported is not None)
    print(outliers.format_table(q, mtype, title=f'{label}: per-layer inf norm and kurtosis '
                                                f'({mtype})'))
    print(outliers.format_summary(q, prefix='quantized ', perplexity=is_lm))
    q = dict(q, quant_config=qcfg.to_dict(),
             resolved_points=(quant.describe(qmodel.quant.rules).split('\n')
                              if hasattr(qmodel.quant, 'rules') else []))
    if qcfg.get('weight_only', False):
      q.update(weight_only_sizes(variables, qvars))
    if glue_sets:
      q['glue'] = glue_report(qmodel, qvars, config, glue_sets, bs, progress=progress,
                              prefix='quantized ')
    result['quantized'] = q

  name = out or (quant_label(result['quantized']['quant_config'] if q is not None else None,
                             method if quantize else '', qat=q is not None and exported is not None,
                             file_name=True))
  os.makedirs(out_dir, exist_ok=True)
  files = []
  if plots_on:
    files.append(plots.per_layer_plot(fp, mtype, os.path.join(out_dir, f'eval_{name}_per_layer.png'),
                                      quantized=q, title=f'{mtype}: {source}'))
    worst = plots.worst_tensor(fp)
    if worst is not None and fp_first is not None:
      vals = {f'FP {worst}': plots.valid_values(fp_first[0], fp_first[1], worst)}
      if q_first is not None:
        vals[f'quantized {worst}'] = plots.valid_values(q_first[0], q_first[1], worst)
      files.append(plots.histogram_plot(vals, os.path.join(out_dir, f'eval_{name}_histogram.png'),
                                        title=f'activations of {worst} (first batch)'))
  result['plots'] = files
  result['name'] = name
  text = json.dumps(_nan_to_none(result), indent=1, sort_keys=True)
  path = os.path.join(out_dir, f'eval_{name}.json')
  for p in (path, os.path.join(out_dir, METRICS_FILE)):   # whole files or none (rename)
    tmp = f'{p}.tmp'
    with open(tmp, 'w') as fh:
      fh.write(text)
    os.replace(tmp, p)
  _info(f'wrote {path} (and {METRICS_FILE}, the newest)'
        + (f', {", ".join(os.path.basename(f) for f in files)}' if files else ''))
  return result


def quant_label(qcfg, method: str = '', qat: bool = False, file_name: bool = False) -> str:
  """What was evaluated, e.g. 'FP', 'W8A8', 'W4A8 AdaRound', 'W6A6 outlier_suppression',
  'QAT W4A8', 'weight-only int8'; file_name: the same as a file-name part ('w4a8_adaround')."""
  if qcfg is None:
    parts = ['FP']
  elif qcfg.get('weight_only', False):
    parts = ['weight-only int8']
  else:
    a = qcfg.get('n_bits_act', 8)
    parts = [f"W{qcfg.get('n_bits', 8)}A{a if a != 32 else 'FP'}"]
    if qat:
      parts.insert(0, 'QAT')
    if method:
      parts.append(method)
    if qcfg.get('adaround', False) and not qat:
      parts.append('AdaRound')
  label = ' '.join(parts)
  return re.sub(r'[^a-z0-9.]+', '_', label.lower()).strip('_') if file_name else label


# ---- text generation (eval.py --prompt) ------------------------------------------------------
def generate_text(config: Optional[ml_collections.ConfigDict], workdir: Optional[str],
                  prompt: str, *, hf_model: Optional[str] = None, max_new_tokens: int = 20,
                  temperature: float = 0.0, top_k: int = 0, quantize: bool = False,
                  progress: bool = True, seed: Optional[int] = None) -> str:
  """Continues `prompt` with the run's OPT model (and tokenizer); prints the prompt, the
  continuation and why it stopped (end-of-sequence token or max_new_tokens) and returns the
  continuation. quantize: the model calibrated with config.quant generates. seed: the
  sampling seed (default config.seed). Every setting is checked before any work."""
  if config is None:
    config = eval_config(None, workdir, hf_model)
  if quantize:
    quant.validate_quant_config(config)
  model, variables, source = load_model(config, workdir, hf_model)
  config = sync_config(config, model, source)
  config = _run_tokenizer(config, workdir)
  if model.cfg.model_type != 'opt' or model.cfg.resolved_head != 'clm':
    raise ConfigError(f'--prompt: text generation needs an OPT causal-LM model, {source} is '
                      f'{model.cfg.model_type} ({model.cfg.resolved_head} head)')
  tok = data.get_tokenizer(config, workdir)
  ids = list(tok(prompt)['input_ids'])
  if not ids:
    raise ConfigError(f'--prompt={prompt!r}: no tokens')
  bad = [i for i in ids if not 0 <= i < model.cfg.vocab_size]
  if bad:
    raise DataError(f'--prompt: token id {bad[0]} of the tokenizer is beyond the model\'s '
                    f'embedding table (vocab_size={model.cfg.vocab_size}): the tokenizer does '
                    'not belong to this model')
  check_generation(model, len(ids), max_new_tokens, temperature, top_k)
  seed = int(config.get('seed', 0) if seed is None else seed)
  if quantize:
    qcfg = config.quant
    _, cal = datasets(config, workdir, calib=True)
    bs = int(config.get('eval_batch_size', 32))
    model, variables = quant.calibrate(
        model, variables, calibration_batches(cal, bs, int(qcfg.est_num_batches)), qcfg,
        progress=progress)
  _info(f'generating up to {_plural(int(max_new_tokens), "token")} with '
        f'{"the quantized " if quantize else "the "}model from {source} '
        f'({"greedy" if temperature == 0 else f"T={temperature}, seed {seed}"}'
        f'{f", top_k={top_k}" if top_k else ""})')
  out = models.generate(model, variables, np.asarray([ids], np.int32), max_new_tokens,
                        temperature=temperature, top_k=top_k, seed=seed,
                        eos_token_id=tok.eos_token_id)
  new = [int(i) for i in np.asarray(out)[0, len(ids):]]
  if tok.eos_token_id is not None and tok.eos_token_id in new:
    new = new[:new.index(tok.eos_token_id)]
    why = f'end-of-sequence token after {_plural(len(new), "token")}'
  else:
    why = f'length: {_plural(len(new), "new token")} (--max_new_tokens)'
  text = tok.decode(new, skip_special_tokens=True)
  print(f'prompt:       {prompt}\ncontinuation: {text}\nstopped:      {why}', flush=True)
  return text
