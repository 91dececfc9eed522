"""Outlier statistics and perplexity of a model (inf norm, kurtosis per layer) and their
reports: the tables and one-line summaries eval.py prints.

The statistics themselves (one jitted forward per batch, which training's periodic evaluation
runs too) are in oqt_jax/train/outlier_stats.py, documented there, and importable from here:
  metrics = outliers.evaluate(model, variables, batches)
  print(outliers.format_table(metrics, model.cfg.model_type))
"""
from __future__ import annotations

import math
from typing import Optional

from oqt_jax.train.outlier_stats import (  # noqa: F401  (the statistics live in train)
    GLOBAL_TENSORS, HEADLINE, IGNORE, KURTOSIS_EPS, KURTOSIS_TENSORS, MODEL_INPUTS, TENSORS,
    _kurtosis_of, accumulate, collect_tensors, evaluate, finalize, inf_norm_per_sequence,
    kurtosis_per_row, kurtosis_per_sequence, make_eval_step, sequence_weight, tensor_sums)


def _cell(v, width: int) -> str:
  """A right-aligned figure, '-' where it does not apply (absent or NaN)."""
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return f'{"-":>{width}}'
  return f'{v:{width}.2f}'


def format_table(metrics: dict, model_type: str, quantized: Optional[dict] = None,
                 title: Optional[str] = None) -> str:
  """A per-layer text table (inf norm / kurtosis of each tensor), FP and optionally quantized
  (rows 'q N'); '-' where a figure does not apply (the FFN residual sum has no kurtosis);
  `title` as its first line."""
  cols = TENSORS[model_type]
  short = {'ffn_output': 'ffn', 'ffn_residual': 'ffn+res', 'ffn_ln_output': 'ffn_ln',
           'attn_output': 'attn', 'attn_ln_output': 'attn_ln', 'layer_output': 'layer'}
  head = 'layer ' + ''.join(f'{short[c] + " inf":>12}{short[c] + " kurt":>13}' for c in cols)
  lines = [title] if title else []
  lines.append(head)
  for tag, m in (('', metrics), ('q ', quantized)):
    if m is None:
      continue
    for row in m['per_layer']:
      cells = ''
      for c in cols:
        v = row.get(c, {})
        cells += _cell(v.get('inf_norm'), 12) + _cell(v.get('kurtosis'), 13)
      lines.append(f'{tag}{row["layer"]:<{6 - len(tag)}}{cells}')
  return '\n'.join(lines)


def _fig(v) -> str:
  return '-' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.2f}'


def format_summary(metrics: dict, prefix: str = '', perplexity: bool = True) -> str:
  """The summary lines; perplexity=False (a classifier: no language-model loss) leaves the
  perplexity out."""
  ppl = metrics.get('perplexity')
  parts = []
  if perplexity and ppl is not None:
    parts.append(f'{prefix}perplexity: {ppl:.4f}')
  parts += [f'{prefix}max inf norm ({metrics["max_inf_norm_tensor"]}): '
            f'{_fig(metrics["max_inf_norm"])}',
            f'{prefix}max inf norm (any tensor): {_fig(metrics["max_inf_norm_any"])}',
            f'{prefix}avg kurtosis: {_fig(metrics["avg_kurtosis"])}',
            f'{prefix}max kurtosis: {_fig(metrics["max_kurtosis"])}']
  for name, v in metrics.get('global', {}).items():
    parts.append(f'{prefix}{name} inf norm: {_fig(v["inf_norm"])}, '
                 f'kurtosis: {_fig(v.get("kurtosis"))}')
  return '\n'.join(parts)
