"""`compare_run(config, workdir, ...)`: every registered quantization method on the same data,
one table.

  python eval.py --config C --workdir W --compare [--methods fp,w8a8_minmax,llm_int8]
      [--setting original|all|both]

The rows are the methods of the registry (oqt_jax.quant.methods.names(), in its order;
--methods selects some), each in the chosen setting: 'original' = the method's preset (its
original's setting; Outlier Suppression's W8A8 preset in this W8A8 table), 'all' = the
outlier-free paper's W8A8 per-tensor setting with every point quantized and the method
applied, 'both' = both rows. Methods with one setting (plain calibration, PEG, W8A{8,16}:
'all'; FP, LLM.int8(), weight-only: 'original') appear once; the setting column says which.
The quant fields given on the command line (`explicit_quant`) hold in every row.

The model is loaded and the data built as for `evaluate_run` (run.py); the calibration
batches (quant.est_num_batches training batches) and the evaluation batches are drawn once
and shared by every row (a preset asking for more calibration samples uses what there is).
Each row is built by `methods.run`, timed ('seconds': wall seconds of the method, compilation
included), then measured by the same evaluator as eval.py (outliers.evaluate: perplexity and
inf norms; for a classification model the GLUE metric of evaluate/glue.py on a GLUE config,
else accuracy). A row that fails records its error and the others still run.

Columns: setting, metric (perplexity for MLM / CLM, lower is better; GLUE metric or accuracy
for classification), delta to FP, max inf norm (the paper's tensor: BERT FFN output, OPT
layer output; of the quantized model), model bytes (`model_bytes`: the real stored bytes
where int8 weights are stored, else weights counted at the method's bit width), seconds.
Written to OUT/comparison.md, comparison.json and comparison.png (bar plot of the metric).
"""
from __future__ import annotations

import json
import math
import os
import time
import traceback
from typing import Any, Optional

import jax
import numpy as np

from oqt_jax import quant
from oqt_jax.errors import ConfigError
from oqt_jax.evaluate import outliers
from oqt_jax.evaluate import setup
from oqt_jax.evaluate.setup import info as _info
from oqt_jax.evaluate.run import nan_to_none
from oqt_jax.evaluate.plots import _plt
from oqt_jax.quant import methods as registry
from oqt_jax.quant import weight_int8
from oqt_jax.quant.calibrate import model_inputs, strip
from oqt_jax.quant.methods import llm_int8
from oqt_jax.quant.points import Rules
from oqt_jax.train import glue_eval

MD_FILE = 'comparison.md'
JSON_FILE = 'comparison.json'
PNG_FILE = 'comparison.png'


def _error_text(e: BaseException) -> str:
  msg = ' '.join(str(e).split())
  return f'{type(e).__name__}: {msg}'[:300]


def _accuracy(model, variables, batches) -> float:
  """Fraction of labelled rows (label != -100) whose argmax logit is the label."""
  fn = jax.jit(lambda v, inputs: model.apply(v, **inputs).logits)
  v = strip(variables)
  hit = n = 0
  for b in batches:
    logits = np.asarray(fn(v, model_inputs(model, b)))
    labels = np.asarray(b['labels']).reshape(-1)
    keep = labels != -100
    hit += int(np.sum(logits.argmax(-1)[keep] == labels[keep]))
    n += int(np.sum(keep))
  return hit / n if n else float('nan')


def metric_of(config, model, qmodel, qvars, batches, metrics: dict) -> tuple[str, float]:
  """(metric name, value) of a row."""
  head = model.cfg.resolved_head
  if head in ('mlm', 'clm'):
    return 'perplexity', metrics.get('perplexity')
  if head == 'cls':
    if config.data.get('source', '') == 'glue':
      m = glue_eval.evaluate_glue(qmodel, qvars, config, batches)
      return f'GLUE {config.data.glue_task} {m.get("metric_name", "score")}', m['metric']
    return 'accuracy', _accuracy(qmodel, qvars, batches)
  return 'loss', metrics.get('loss')


def _fmt(v, spec='.4f') -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return 'n/a' if v is None else str(v)
  return format(v, spec)


def _rules_bits(rules):
  """weight site -> bits under `rules` (None: stored as is, e.g. an FP head)."""
  def bits(site):
    specs = [rules.spec(p) for p in site.points]
    if not specs or not all(s.enabled for s in specs):
      return None
    return max(s.n_bits for s in specs)
  return bits


def model_bytes(model, variables, qmodel, qvariables, info: dict) -> int:
  """A row's model size in bytes: the stored bytes where the method stores int8 weights
  (LLM.int8(), weight-only: info['stored_bytes']); FP: the parameters as stored; otherwise
  the parameters with each quantized weight counted at its bit width (+ float32 scales, one
  per output channel with per-channel weights), the rest as stored."""
  if 'stored_bytes' in info:
    return int(info['stored_bytes'])
  if info.get('name') == 'fp' or getattr(qmodel, 'quant', None) is None:
    return weight_int8.param_bytes(variables, ('params',))
  q = info['qcfg']
  rules = getattr(qmodel.quant, 'rules', None) or Rules.build(q, model.cfg)
  base = {'params': qvariables['params']} if 'params' in qvariables else variables
  return weight_int8.model_bytes(qmodel, base, _rules_bits(rules),
                                 per_channel=bool(q.get('per_channel', False)))


def format_markdown(report: dict) -> str:
  mname = report['metric']
  lines = [f'| method | setting | {mname} | delta to FP | max inf norm | model bytes | seconds '
           '| notes |',
           '|---|---|---:|---:|---:|---:|---:|---|']
  for r in report['rows']:
    if r.get('error'):
      lines.append(f'| {r["label"]} ({r["name"]}) | {r["setting"]} | error: {r["error"]} '
                   '| | | | | |')
      continue
    lines.append(f'| {r["label"]} ({r["name"]}) | {r["setting"]} | {_fmt(r["metric"])} | '
                 f'{_fmt(r["delta"], "+.4f")} | {_fmt(r["max_inf_norm"], ".2f")} | '
                 f'{r["model_bytes"]:,} | {_fmt(r["seconds"], ".1f")} | '
                 f'{r.get("notes", "")} |')
  return '\n'.join(lines)


def bar_plot(report: dict, path: str) -> str:
  plt = _plt()
  rows = [r for r in report['rows'] if not r.get('error') and r.get('metric') is not None
          and math.isfinite(r['metric'])]
  fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 2), 4.5))
  count = {}
  for r in rows:
    count[r['name']] = count.get(r['name'], 0) + 1
  names = [r['name'] if count[r['name']] == 1 else f'{r["name"]} ({r.get("setting")})'
           for r in rows]
  vals = [r['metric'] for r in rows]
  colors = ['tab:gray' if r['name'] == 'fp' else 'tab:blue' for r in rows]
  bars = ax.bar(range(len(rows)), vals, color=colors)
  ax.bar_label(bars, labels=[f'{v:.4g}' for v in vals], fontsize=7)
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels(names, rotation=35, ha='right', fontsize=8)
  fp = report.get('fp_metric')
  if fp is not None:
    ax.axhline(fp, color='tab:gray', ls='--', lw=1, label='FP')
    ax.legend(fontsize=8)
  if report['metric'] == 'perplexity' and vals and max(vals) > 10 * max(min(vals), 1e-9):
    ax.set_yscale('log')
  ax.set_ylabel(report['metric'])
  failed = [r['name'] for r in report['rows'] if r.get('error')]
  title = f'{report["model_type"]}: {report["metric"]} per method ({report.get("setting", "original")} setting)'
  if failed:
    title += f'\n(failed: {", ".join(failed)})'
  ax.set_title(title, fontsize=9)
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def compare_run(config, workdir: Optional[str], *, hf_model: Optional[str] = None,
                methods=None, setting: str = 'original', num_batches: Optional[int] = None,
                batch_size: Optional[int] = None, out_dir: Optional[str] = None,
                plots_on: bool = True, progress: bool = True,
                explicit_quant=()) -> dict[str, Any]:
  """Runs the registered methods `methods` ('a,b,c', a list, or None: all) in `setting`
  ('original', 'all', 'both') and writes the comparison (module docstring)."""
  plan = registry.rows(methods, setting)
  quant.validate_quant_config(config)
  out_dir = out_dir or workdir
  if not out_dir:
    raise ConfigError('--workdir: needed to write comparison.md (or give out_dir)')
  model, variables, source = setup.load_model(config, workdir, hf_model)
  config = setup.sync_config(config, model, source)
  mtype = model.cfg.model_type
  bs = int(batch_size or config.get('eval_batch_size', 32))
  nb = int(num_batches or config.get('num_eval_batches', 50))
  val, cal = setup.datasets(config, workdir, calib=True)
  nb = min(nb, val.num_eval_batches(bs)) if hasattr(val, 'num_eval_batches') else nb
  eval_batches = list(val.eval_batches(bs, nb))
  n_cal = int(config.quant.est_num_batches)
  cal_batches = list(setup.calibration_batches(cal, bs, n_cal))
  _info(f'comparing {len(plan)} rows ({setting} setting) on {mtype} '
        f'({model.cfg.resolved_head}) from {source}: {len(cal_batches)} calibration and '
        f'{len(eval_batches)} evaluation batches of {bs}')

  rows = []
  fp_metric = None
  metric_name = None
  it = plan
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(plan, desc='methods', unit='row')
  for name, row_setting in it:
    qcfg = registry.resolve(name, config.quant, explicit_quant, row_setting, batch_size=bs,
                            table=True)   # the row's quant config, validated once
    row: dict[str, Any] = dict(name=name, setting=row_setting,
                               label=registry.label_of(name, qcfg))
    try:
      t0 = time.perf_counter()
      qmodel, qvars, info = registry.run(name, model, variables, cal_batches, qcfg,
                                         setting=row_setting)
      jax.block_until_ready(jax.tree_util.tree_leaves(qvars))
      row['seconds'] = row['calib_seconds'] = time.perf_counter() - t0
      row['label'] = info['label']
      m = outliers.evaluate(qmodel, qvars, iter(eval_batches), num_batches=len(eval_batches),
                            desc=name)
      mname, value = metric_of(config, model, qmodel, qvars, eval_batches, m)
      metric_name = metric_name or mname
      row.update(metric=value, perplexity=m.get('perplexity'), loss=m.get('loss'),
                 max_inf_norm=m['max_inf_norm'], max_inf_norm_any=m['max_inf_norm_any'],
                 avg_kurtosis=m['avg_kurtosis'],
                 model_bytes=model_bytes(model, variables, qmodel, qvars, info),
                 quant_config=info['qcfg'].to_dict())
      if 'peg_groups' in info:
        row['peg_groups'] = info['peg_groups']
      if name == 'llm_int8':
        fr = llm_int8.outlier_fractions(qmodel, qvars, eval_batches)
        row['threshold'] = info['threshold']
        row['outlier_fraction_per_layer'] = fr
        row['outlier_fraction_mean'] = float(np.mean(list(fr.values()))) if fr else 0.0
        row['notes'] = f'outlier dims: {row["outlier_fraction_mean"]:.2%} of Dense inputs'
        _info(llm_int8.format_fractions(fr))
      if name == 'fp':
        fp_metric = value
    except Exception as e:   # a failing method fails its row only
      row['error'] = _error_text(e)
      _info(f'{name} ({row_setting}): {row["error"]}')
      if os.environ.get('OQT_COMPARE_TRACEBACK'):
        traceback.print_exc()
    rows.append(row)
  if fp_metric is None and any(not r.get('error') for r in rows):   # the delta's reference
    m = outliers.evaluate(model, variables, iter(eval_batches), num_batches=len(eval_batches),
                          desc='fp')
    fp_metric = metric_of(config, model, model, variables, eval_batches, m)[1]
  for r in rows:
    if not r.get('error'):
      r['delta'] = (r['metric'] - fp_metric if fp_metric is not None and r['metric'] is not None
                    else None)
  report = dict(model_path=source, model_type=mtype, head=model.cfg.resolved_head,
                metric=metric_name or 'perplexity', setting=setting,
                num_eval_batches=len(eval_batches), num_calibration_batches=len(cal_batches),
                batch_size=bs, fp_metric=fp_metric, quant_config=config.quant.to_dict(),
                rows=rows)
  title = (f'Quantization methods on {source} ({mtype}, {report["metric"]}; '
           f'setting: {setting})')
  table = format_markdown(report)
  print(f'{title}\n{table}')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, MD_FILE), 'w') as fh:
    fh.write(f'# {title}\n\n{table}\n\n'
             f'{len(cal_batches)} calibration and {len(eval_batches)} evaluation batches of '
             f'{bs}; metric: {report["metric"]}; setting original = the method\'s preset (its '
             'original\'s setting), all = W8A8 per-tensor, every point quantized, with the '
             'method applied; model bytes: stored bytes where int8 weights are stored, else '
             'weights at the method\'s bit width plus float32 scales, other parameters as '
             'stored; seconds: the method\'s wall time.\n')
  with open(os.path.join(out_dir, JSON_FILE), 'w') as fh:
    json.dump(nan_to_none(report), fh, indent=1, sort_keys=True)
  files = [os.path.join(out_dir, MD_FILE), os.path.join(out_dir, JSON_FILE)]
  if plots_on:
    files.append(bar_plot(report, os.path.join(out_dir, PNG_FILE)))
  report['files'] = files
  _info('wrote ' + ', '.join(files))
  return report
