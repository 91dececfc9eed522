"""PNG plots of the outlier statistics (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from oqt_jax.evaluate.outliers import HEADLINE, TENSORS


def _plt():
  import matplotlib
  matplotlib.use('Agg', force=True)
  import matplotlib.pyplot as plt
  return plt


def per_layer_plot(metrics: dict, model_type: str, path: str,
                   quantized: Optional[dict] = None, title: str = '') -> str:
  """Inf norm and kurtosis per layer for every measured tensor; quantized dashed."""
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for k, (stat, ax) in enumerate((('inf_norm', axes[0]), ('kurtosis', axes[1]))):
    for c, t in enumerate(TENSORS[model_type]):
      for tag, m, style in (('FP', metrics, '-o'), ('quantized', quantized, '--x')):
        if m is None:
          continue
        rows = [r for r in m['per_layer'] if stat in r.get(t, {})]   # kurtosis: some tensors
        layers = [r['layer'] for r in rows]
        vals = [r[t][stat] for r in rows]
        if not vals:
          continue
        lw = 2.2 if t == HEADLINE[model_type] else 1.0
        ax.plot(layers, vals, style, color=colors[c % len(colors)], lw=lw, ms=4,
                label=f'{t} ({tag})' if quantized is not None else t)
    ax.set_xlabel('layer')
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel('inf norm (mean over sequences)' if stat == 'inf_norm'
                  else 'kurtosis (mean over sequences)')
    if stat == 'kurtosis' or max(_finite_max(metrics), _finite_max(quantized)) > 100:
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(title or 'per-layer outlier statistics')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _finite_max(m) -> float:
  if m is None:
    return 0.0
  vals = [v['inf_norm'] for r in m['per_layer'] for k, v in r.items() if k != 'layer']
  vals = [v for v in vals if np.isfinite(v)]
  return max(vals) if vals else 0.0


def histogram_plot(values: dict, path: str, title: str = '') -> str:
  """Histogram(s) of activation values, log count axis; values: {label: 1-d array}."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4))
  allv = np.concatenate([np.ravel(v) for v in values.values()]) if values else np.zeros(1)
  lo, hi = float(np.min(allv)), float(np.max(allv))
  if hi <= lo:
    hi = lo + 1.0
  bins = np.linspace(lo, hi, 200)
  for label, v in values.items():
    ax.hist(np.ravel(v), bins=bins, histtype='step', log=True, label=label)
  ax.set_xlabel('activation value')
  ax.set_ylabel('count')
  ax.legend(fontsize=8)
  ax.set_title(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def worst_tensor(metrics: dict) -> Optional[str]:
  """'L{i}/{tensor}' with the largest mean inf norm."""
  best, name = -1.0, None
  for r in metrics['per_layer']:
    for t, v in r.items():
      if t != 'layer' and np.isfinite(v['inf_norm']) and v['inf_norm'] > best:
        best, name = v['inf_norm'], f'L{r["layer"]}/{t}'
  return name


def valid_values(tensors: dict, mask: np.ndarray, name: str, limit: int = 200_000) -> np.ndarray:
  """The values of `name` at valid tokens (at most `limit`, evenly subsampled)."""
  x = np.asarray(tensors[name], np.float32)
  v = x[np.asarray(mask, bool)].reshape(-1)
  if v.size > limit:
    v = v[:: int(np.ceil(v.size / limit))]
  return v
