"""GLUE metrics and evaluation of a sequence-classification model (training's periodic
evaluation and eval.py; also importable as oqt_jax.evaluate.glue).

  m = glue_metrics('mrpc', logits_or_class_ids, labels)     # {'accuracy', 'f1', 'score', 'metric'}
  m = evaluate_glue(model, variables, config, batches)      # the same from a model's forward

The metrics are those of the GLUE benchmark (and of the `glue` metric the originals use),
computed with scikit-learn / scipy:

  cola        matthews_correlation        (sklearn.metrics.matthews_corrcoef)
  sst2, mnli, qnli, rte, wnli  accuracy   (sklearn.metrics.accuracy_score)
  mrpc, qqp   accuracy, f1 (positive class 1)   (sklearn.metrics.f1_score)
  stsb        pearson, spearmanr          (scipy.stats.pearsonr / spearmanr)

`glue_metrics` lives with the task table (oqt_jax.data.glue) and is re-exported here.
'score' is the mean of the task's metrics (the originals' "combined_score" for mrpc, qqp and
stsb, the single metric otherwise) and 'metric' is the same number: the headline figure a
comparison table shows for the task. Rows labelled -100 (the filler rows of eval batches)
are ignored.

`evaluate_glue(model, variables, config, batches)` runs the model (FP or quantized: any
`(model, variables)` that `model.apply` accepts, e.g. the output of `quant.calibrate`) over
host batches with 'labels' (one jitted forward, compiled once for the fixed batch shape) and
returns the metrics plus 'task', 'num_examples' and 'eval_loss' (mean cross-entropy, or mean
squared error for stsb).
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from oqt_jax.data.glue import IGNORE_INDEX, glue_metrics, glue_task_info  # noqa: F401

MODEL_INPUTS = {'bert': ('input_ids', 'attention_mask', 'token_type_ids'),
                'opt': ('input_ids', 'attention_mask')}


@functools.lru_cache(maxsize=8)
def _forward(model):
  mtype = model.cfg.model_type

  def fwd(variables, batch):
    inputs = {k: batch[k] for k in MODEL_INPUTS[mtype] if k in batch}
    return model.apply(variables, **inputs).logits.astype(jnp.float32)
  return jax.jit(fwd)


def predict(model, variables, batches: Iterable[Mapping[str, np.ndarray]]
            ) -> tuple[np.ndarray, np.ndarray]:
  """(logits (N, C), labels (N,)) of `model` over host batches (filler rows kept, label -100).

  Every batch must have the shape of the first (eval_batches pads its last batch), so the
  forward compiles once."""
  if model.cfg.resolved_head != 'cls':
    raise ValueError(f"GLUE evaluation needs a sequence-classification model (head 'cls'), "
                     f'got {model.cfg.resolved_head!r}')
  fwd = _forward(model)
  variables = {k: v for k, v in dict(variables).items() if k != 'intermediates'}
  logits, labels = [], []
  for b in batches:
    b = {k: np.asarray(v) for k, v in b.items() if v is not None}
    logits.append(np.asarray(jax.device_get(fwd(variables, b))))
    labels.append(np.asarray(b['labels']))
  if not logits:
    raise ValueError('GLUE evaluation: no batches')
  return np.concatenate(logits), np.concatenate(labels)


def loss_of(logits: np.ndarray, labels: np.ndarray, is_regression: bool) -> float:
  """Mean cross-entropy (classification) or squared error (regression) over labelled rows."""
  keep = labels != IGNORE_INDEX
  logits, labels = logits[keep].astype(np.float64), labels[keep]
  if not len(labels):
    return float('nan')
  if is_regression:
    return float(np.mean((logits[:, 0] - labels) ** 2))
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return float(-np.mean(logp[np.arange(len(labels)), labels.astype(np.int64)]))


def evaluate_glue(model, variables, config, batches: Iterable[Mapping[str, np.ndarray]]
                  ) -> dict[str, Any]:
  """GLUE metrics of (model, variables) on `batches` for the task config.data.glue_task.

  Returns {'task', 'metric' (headline: the task's score), the task's metrics, 'score',
  'num_examples', 'eval_loss'}.
  """
  task = config.data.glue_task
  info = glue_task_info(task)
  logits, labels = predict(model, variables, batches)
  out: dict[str, Any] = {'task': task}
  out.update(glue_metrics(task, logits, labels))
  out['num_examples'] = int((labels != IGNORE_INDEX).sum())
  out['eval_loss'] = loss_of(logits, labels, info.is_regression)
  return out


def format_glue(m: Mapping[str, Any], prefix: str = '') -> str:
  """One line: 'rte: accuracy 0.6643 (277 examples)'."""
  info = glue_task_info(m['task'])
  parts = ', '.join(f'{k} {m[k]:.4f}' for k in info.metric_names)
  return f'{prefix}{m["task"]}: {parts} ({m["num_examples"]} examples)'
