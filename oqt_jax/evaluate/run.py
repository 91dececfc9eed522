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
import sys
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from oqt_jax import models
from oqt_jax.errors import CheckpointError, ConfigError, DataError
from oqt_jax.evaluate import outliers, plots

log = logging.getLogger(__name__)

HF_DIR = 'hf'
CKPT_DIR = 'checkpoints'
METRICS_FILE = 'eval_metrics.json'
PER_LAYER_PNG = 'eval_per_layer.png'
HISTOGRAM_PNG = 'eval_histogram.png'
SYNCED_MODEL_FIELDS = ('model_type', 'head', 'vocab_size', 'pad_token_id',
                       'max_position_embeddings', 'num_layers', 'hidden_size')
TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt', 'tokenizer_config.json')


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
  from oqt_jax.models.hf import VARIANT_FIELDS
  default = models.ModelConfig()
  return {f: config.model[f] for f in VARIANT_FIELDS
          if f in config.model and config.model[f] != getattr(default, f)}


def load_model(config, workdir: Optional[str], hf_model: Optional[str] = None):
  """(model, variables, source path) of the run to evaluate."""
  from oqt_jax.models import hf
  if hf_model:
    path = os.path.expanduser(hf_model)
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


def load_orbax(config, workdir: str):
  """Parameters of the newest Orbax step in workdir/checkpoints; model config from the run's
  workdir/config.json (written by the training loop, sized to its tokenizer) if present."""
  import orbax.checkpoint as ocp
  mcfg = config.model
  saved = os.path.join(workdir, 'config.json')
  if os.path.exists(saved):
    try:
      with open(saved) as fh:
        mcfg = json.load(fh).get('model', mcfg)
    except (OSError, json.JSONDecodeError) as e:
      raise CheckpointError(f'{saved}: cannot be read ({type(e).__name__})') from e
  model = models.build(mcfg)
  ckpt_dir = os.path.abspath(os.path.join(workdir, CKPT_DIR))
  try:
    mngr = ocp.CheckpointManager(ckpt_dir)
    step = mngr.latest_step()
    items = mngr.restore(step, args=ocp.args.StandardRestore())
  except Exception as e:   # orbax / tensorstore raise many types
    text = ' '.join(str(e).split())[:160]
    raise CheckpointError(f'{ckpt_dir}: cannot restore the newest step '
                          f'({type(e).__name__}: {text})') from e
  params = items.get('params') if isinstance(items, dict) else None
  if params is None:
    raise CheckpointError(f'{ckpt_dir}/{step}: no params in the checkpoint')
  expect = jax.eval_shape(lambda r: models.init_variables(model, r)['params'],
                          jax.random.PRNGKey(0))
  want = {jax.tree_util.keystr(p): l.shape for p, l in
          jax.tree_util.tree_flatten_with_path(expect)[0]}
  got = {jax.tree_util.keystr(p): np.shape(l) for p, l in
         jax.tree_util.tree_flatten_with_path(params)[0]}
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:2]
    raise CheckpointError(f'{ckpt_dir}/{step}: parameters do not match the model config '
                          f'(first differences: {diff})')
  return model, {'params': params}


# ---- data ------------------------------------------------------------------------------------
def sync_config(config, model, model_path: Optional[str]):
  """A copy of config whose model fields agree with the loaded model (and its tokenizer)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for f in SYNCED_MODEL_FIELDS:
      setattr(config.model, f, getattr(model.cfg, f))
    if (model_path and os.path.isdir(model_path) and not config.data.get('tokenizer', '')
        and any(os.path.exists(os.path.join(model_path, f)) for f in TOKENIZER_FILES)):
      config.data.tokenizer = model_path
  return config


def datasets(config, workdir, calib: bool):
  from oqt_jax import data
  tok = data.get_tokenizer(config, workdir)
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
                 progress: bool = True, explicit_quant: Sequence[str] = ()) -> dict[str, Any]:
  """Evaluate FP (and with `quantize` the calibrated quantized model); write metrics + plots.

  The quantized model comes from the method config.quant.method ('' = plain calibration;
  oqt_jax.quant.methods.METHODS); the method's preset (the original's bits, granularity,
  calibration samples) fills the quant fields not named in `explicit_quant`.
  """
  from oqt_jax import quant
  if quantize:
    quant.validate_quant_config(config)
  out_dir = out_dir or workdir
  if not out_dir:
    raise ConfigError('--workdir: needed to write eval_metrics.json (or give out_dir)')
  model, variables, source = load_model(config, workdir, hf_model)
  config = sync_config(config, model, source)
  mtype = model.cfg.model_type
  bs = int(batch_size or config.get('eval_batch_size', 32))
  nb = int(num_batches or config.get('num_eval_batches', 50))
  val, cal = datasets(config, workdir, calib=quantize)
  nb = min(nb, val.num_eval_batches(bs)) if hasattr(val, 'num_eval_batches') else nb
  _info(f'evaluating {mtype} ({model.cfg.resolved_head}) from {source}: {nb} batches of {bs}')

  fp, fp_first = outliers.evaluate(model, variables, val.eval_batches(bs, nb), num_batches=nb,
                                   progress=progress, desc='FP eval', keep_first=True)
  print(outliers.format_table(fp, mtype))
  print(outliers.format_summary(fp))
  result: dict[str, Any] = dict(fp)
  result.update(model_path=source, model_type=mtype, head=model.cfg.resolved_head,
                num_batches=nb, batch_size=bs)

  q = q_first = None
  if quantize:
    from oqt_jax.quant import methods
    method = config.quant.get('method', '')
    qcfg = methods.with_preset(config.quant, method, explicit_quant, batch_size=bs)
    quant.validate_quant_config(qcfg)
    _info(f'calibrating on {qcfg.est_num_batches} batches (method={method or "calibrate"}, '
          f'W{qcfg.n_bits}A{qcfg.n_bits_act}, quant_setup={qcfg.quant_setup}, '
          f'quant_dict={qcfg.quant_dict!r}, int8={qcfg.int8})')
    qmodel, qvars = methods.run(
        method, model, variables, calibration_batches(cal, bs, int(qcfg.est_num_batches)), qcfg,
        progress=progress)
    q, q_first = outliers.evaluate(qmodel, qvars, val.eval_batches(bs, nb), num_batches=nb,
                                   progress=progress, desc='quantized eval', keep_first=True)
    print(outliers.format_table(q, mtype))
    print(outliers.format_summary(q, prefix='quantized '))
    q = dict(q, quant_config=qcfg.to_dict(),
             resolved_points=quant.describe(qmodel.quant.rules).split('\n'))
    result['quantized'] = q

  os.makedirs(out_dir, exist_ok=True)
  files = []
  if plots_on:
    files.append(plots.per_layer_plot(fp, mtype, os.path.join(out_dir, PER_LAYER_PNG),
                                      quantized=q, title=f'{mtype}: {source}'))
    worst = plots.worst_tensor(fp)
    if worst is not None and fp_first is not None:
      vals = {f'FP {worst}': plots.valid_values(fp_first[0], fp_first[1], worst)}
      if q_first is not None:
        vals[f'quantized {worst}'] = plots.valid_values(q_first[0], q_first[1], worst)
      files.append(plots.histogram_plot(vals, os.path.join(out_dir, HISTOGRAM_PNG),
                                        title=f'activations of {worst} (first batch)'))
  result['plots'] = files
  path = os.path.join(out_dir, METRICS_FILE)
  with open(path, 'w') as fh:
    json.dump(_nan_to_none(result), fh, indent=1, sort_keys=True)
  _info(f'wrote {path}' + (f' and {", ".join(os.path.basename(f) for f in files)}'
                           if files else ''))
  return result
