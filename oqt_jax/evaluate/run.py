"""`evaluate_run(config, workdir, ...)`: what eval.py does, as a library call.

The pipeline, one function per step: check and resolve the quant config (once, at the door:
`resolve_quant`) -> load the model (evaluate/setup.py) -> data (setup.py) -> evaluate FP
(`evaluate_model`) -> quantize (`quantize_model`: the method registry) -> evaluate the quantized
model -> report (`write_report`). Checks before any batch: evaluate/checks.py; GLUE dev sets:
evaluate/glue.py; eval.py --prompt: evaluate/generation.py.

Model: --hf_model PATH, else the newest of workdir/hf (the training loop's HF export) and
workdir/checkpoints (Orbax; parameters only). Data: the config's source, validation split
(calibration batches from the train split). Writes workdir/eval_metrics.json and PNG plots.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Optional, Sequence

import ml_collections

from oqt_jax import quant
from oqt_jax.config import prepare_workdir
from oqt_jax.errors import ConfigError, DataError
from oqt_jax.evaluate import outliers, plots
from oqt_jax.evaluate.checks import (check_finite_metrics, check_finite_params,
                                     check_quant_for_model, check_quant_points, checked)
from oqt_jax.evaluate.glue import glue_datasets, glue_report
from oqt_jax.evaluate.setup import (calibration_batches, datasets, info, load_model, plural,
                                    run_tokenizer, sync_config)
from oqt_jax.quant import methods, weight_int8
from oqt_jax.quant.methods import qat

METRICS_FILE = 'eval_metrics.json'
OUT_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')
# Methods that quantize each batch as it comes (nothing calibrated beforehand).
NO_CALIBRATION = frozenset({'fp', 'llm_int8', 'weight_only', 'weight_int8', 'dynamic'})


# ---- weight-only int8 --------------------------------------------------------------------------
def weight_only_sizes(variables, qvars) -> dict:
  return dict(model_bytes_fp=weight_int8.param_bytes(variables),
              model_bytes_int8=weight_int8.param_bytes(qvars))


def weight_only_report(variables, qvars) -> str:
  s = weight_only_sizes(variables, qvars)
  return (f"weight-only int8: model size {s['model_bytes_fp']:,} bytes -> "
          f"{s['model_bytes_int8']:,} bytes ({s['model_bytes_int8'] / s['model_bytes_fp']:.1%})")


# ---- the run ---------------------------------------------------------------------------------
def nan_to_none(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None if math.isnan(x) else ('inf' if x > 0 else '-inf')
  if isinstance(x, dict):
    return {k: nan_to_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [nan_to_none(v) for v in x]
  return x


def check_eval_args(out, num_batches, batch_size) -> None:
  if out is not None and not OUT_NAME_RE.match(out):
    raise ConfigError(f'--out={out!r}: expected a name of letters, digits, ".", "_", "-" '
                      '(it names the files eval_NAME.json, ...)')
  for flag, v in (('--num_batches', num_batches), ('--batch_size', batch_size)):
    if v is not None and v < 1:
      raise ConfigError(f'{flag}={v}: must be >= 1')


def resolve_quant(config, explicit_quant: Sequence[str] = (), batch_size: Optional[int] = None,
                  model_type: str = ''):
  """The door of a quantized evaluation: config.quant resolved with its method's preset (the
  fields not in `explicit_quant`) and validated, once (ConfigError: one line naming the first
  bad field), into the read-only QuantConfig everything below takes without checking it
  again."""
  check_quant_points(config.quant, model_type)
  return methods.with_preset(config.quant, config.quant.get('method', ''), explicit_quant,
                             batch_size=batch_size)


def eval_batch_count(config, val, bs: int, num_batches: Optional[int]) -> int:
  nb = int(num_batches or config.get('num_eval_batches', 50))
  if nb <= 0 and hasattr(val, 'num_eval_batches'):    # <= 0: the whole validation split
    nb = val.num_eval_batches(bs)
  nb = min(nb, val.num_eval_batches(bs)) if hasattr(val, 'num_eval_batches') else nb
  if nb < 1:
    raise DataError(f'validation split: no evaluation batch (the split is empty, or '
                    f'num_eval_batches={config.get("num_eval_batches")} is 0)')
  return nb


def evaluate_model(model, variables, config, val, bs: int, nb: int, source, *, label: str,
                   glue_sets: dict, progress: bool, quantized: bool = False):
  """(metrics, first batch's activations) of one model on the validation batches, its tables
  printed (per-layer inf norm and kurtosis, the summary, GLUE metrics where scored)."""
  mtype = model.cfg.model_type
  m, first = outliers.evaluate(model, variables, checked(val.eval_batches(bs, nb), model,
                                                         'validation batch'), num_batches=nb,
                               progress=progress,
                               desc='quantized eval' if quantized else 'FP eval', keep_first=True)
  check_finite_metrics(m, source, what='quantized model' if quantized else 'model')
  print(outliers.format_table(m, mtype, title=f'{label}: per-layer inf norm and kurtosis '
                                             f'({mtype})'))
  print(outliers.format_summary(m, prefix='quantized ' if quantized else '',
                                perplexity=model.cfg.resolved_head in ('mlm', 'clm')))
  m = dict(m)
  if glue_sets:
    m['glue'] = glue_report(model, variables, config, glue_sets, bs, progress=progress,
                            prefix='quantized ' if quantized else '')
  return m, first


def quantize_model(model, variables, qcfg, cal, bs: int, source, *, explicit_quant=(),
                   progress: bool = True):
  """(qmodel, qvariables, qcfg used, from_qat) of the resolved quant config `qcfg`: a QAT
  run's learned quantizers where `source` holds them, else the registry's method
  (qcfg.method; '' = plain calibration) on calibration batches of `cal`."""
  method = qcfg.get('method', '')
  calibrating = lambda n: info(
      f'calibrating on {plural(n, "batch")} (method={method or "calibrate"}'
      f'{", AdaRound" if qcfg.get("adaround", False) else ""}, W{qcfg.n_bits}A{qcfg.n_bits_act}'
      f', quant_setup={qcfg.quant_setup}, quant_dict={qcfg.quant_dict!r}, int8={qcfg.int8})')
  exported = None if qcfg.get('adaround', False) else qat.quantized_from_export(
      model, variables, source if os.path.isdir(str(source)) else None)
  if qcfg.get('weight_only', False):   # int8 weights, FP activations: no calibration
    qmodel, qvars = quant.weight_only(model, variables)
    info(weight_only_report(variables, qvars))
    return qmodel, qvars, qcfg, False
  if exported is not None:             # a QAT run: the quantizers it learned, no calibration
    asked, (qmodel, qvars, qcfg) = qcfg, exported
    info(f'using the quantizers learned by QAT ({os.path.join(source, qat.STATE_FILE)}: '
          f'W{qcfg.n_bits}A{qcfg.n_bits_act}, quant_setup={qcfg.quant_setup}, '
          f'quant_dict={qcfg.quant_dict!r}); no calibration')
    ignored = [f'{k}={asked.get(k)!r}' for k in dict.fromkeys(explicit_quant)
               if k in asked and k in qcfg and asked.get(k) != qcfg.get(k)]
    if ignored:
      info(f'note: quant.{", quant.".join(ignored)} on the command line ignored: a QAT run '
            'is evaluated with the quantizers it learned')
    return qmodel, qvars, qcfg, True
  if qcfg.get('adaround', False):      # AdaRound weights (calibration batches + samples)
    n_cal = max(int(qcfg.est_num_batches), -(-int(qcfg.adaround_samples) // bs))
    calibrating(n_cal)
    qmodel, qvars = quant.adaround(
        model, variables, checked(calibration_batches(cal, bs, n_cal), model,
                                  'calibration batch'), qcfg, progress=progress)
    return qmodel, qvars, qcfg, False
  if method in NO_CALIBRATION:
    info(f'quantizing with {method} (no calibration: ranges from each batch)')
  else:
    calibrating(int(qcfg.est_num_batches))
  qmodel, qvars, _ = methods.run(
      method, model, variables,
      checked(calibration_batches(cal, bs, int(qcfg.est_num_batches)), model,
              'calibration batch'), qcfg, progress=progress)
  return qmodel, qvars, qcfg, False


def write_report(result: dict, out_dir: str, name: str, fp, fp_first, q, q_first, mtype: str,
                 source, plots_on: bool) -> str:
  """Plots and out_dir/eval_NAME.json (+ eval_metrics.json, the newest), each file whole or
  not at all; returns the JSON's path."""
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
  text = json.dumps(nan_to_none(result), indent=1, sort_keys=True)
  path = os.path.join(out_dir, f'eval_{name}.json')
  for p in (path, os.path.join(out_dir, METRICS_FILE)):   # whole files or none (rename)
    tmp = f'{p}.tmp'
    with open(tmp, 'w') as fh:
      fh.write(text)
    os.replace(tmp, p)
  info(f'wrote {path} (and {METRICS_FILE}, the newest)'
        + (f', {", ".join(os.path.basename(f) for f in files)}' if files else ''))
  return path


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

  The pipeline: check and resolve (once, here) -> load -> data -> evaluate FP -> quantize
  (the registry) -> evaluate quantized -> report.
  """
  check_eval_args(out, num_batches, batch_size)
  bs = int(batch_size or config.get('eval_batch_size', 32))
  qcfg = resolve_quant(config, explicit_quant, bs, '' if hf_model else
                       config.model.get('model_type', '')) if quantize else None
  out_dir = out_dir or workdir
  if not out_dir:
    raise ConfigError('--workdir: needed to write eval_metrics.json (or give out_dir)')

  model, variables, source = load_model(config, workdir, hf_model)
  config = run_tokenizer(sync_config(config, model, source), workdir)
  check_finite_params(variables, source)
  if quantize:
    check_quant_for_model(qcfg, model, variables)
  out_dir = prepare_workdir(out_dir, field='--workdir')
  mtype = model.cfg.model_type

  val, cal = datasets(config, workdir, calib=quantize)
  nb = eval_batch_count(config, val, bs, num_batches)
  glue_sets = glue_datasets(config, workdir, val)
  info(f'evaluating {mtype} ({model.cfg.resolved_head}) from {source}: '
        f'{plural(nb, "batch")} of {bs}')

  fp, fp_first = evaluate_model(model, variables, config, val, bs, nb, source, label='FP',
                                glue_sets=glue_sets, progress=progress)
  result: dict[str, Any] = dict(fp)
  result.update(model_path=source, model_type=mtype, head=model.cfg.resolved_head,
                num_batches=nb, batch_size=bs)

  q = q_first = None
  from_qat = False
  method = qcfg.get('method', '') if quantize else ''
  if quantize:
    qmodel, qvars, qcfg, from_qat = quantize_model(model, variables, qcfg, cal, bs, source,
                                                   explicit_quant=explicit_quant,
                                                   progress=progress)
    q, q_first = evaluate_model(qmodel, qvars, config, val, bs, nb, source,
                                label=quant_label(qcfg, method, qat=from_qat),
                                glue_sets=glue_sets, progress=progress, quantized=True)
    q.update(quant_config=qcfg.to_dict(),
             resolved_points=(quant.describe(qmodel.quant.rules).split('\n')
                              if hasattr(qmodel.quant, 'rules') else []))
    if qcfg.get('weight_only', False):
      q.update(weight_only_sizes(variables, qvars))
    result['quantized'] = q

  name = out or quant_label(qcfg, method, qat=from_qat, file_name=True)
  write_report(result, out_dir, name, fp, fp_first, q, q_first, mtype, source, plots_on)
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
