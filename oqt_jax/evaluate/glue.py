"""GLUE metrics and evaluation of a sequence-classification model.

  m = glue_metrics('mrpc', logits_or_class_ids, labels)     # {'accuracy', 'f1', 'score', 'metric'}
  m = evaluate_glue(model, variables, config, batches)      # the same from a model's forward

The metrics are those of the GLUE benchmark (and of the `glue` metric the originals use),
computed with scikit-learn / scipy:

  cola        matthews_correlation        (sklearn.metrics.matthews_corrcoef)
  sst2, mnli, qnli, rte, wnli  accuracy   (sklearn.metrics.accuracy_score)
  mrpc, qqp   accuracy, f1 (positive class 1)   (sklearn.metrics.f1_score)
  stsb        pearson, spearmanr          (scipy.stats.pearsonr / spearmanr)

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

from oqt_jax.data.glue import IGNORE_INDEX, glue_task_info

MODEL_INPUTS = {'bert': ('input_ids', 'attention_mask', 'token_type_ids'),
                'opt': ('input_ids', 'attention_mask')}


def _finite_or_zero(x) -> float:
  x = float(x)
  return x if np.isfinite(x) else 0.0


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
  """The task's metrics from predictions (class ids, logits (N, C), or regression floats
  (N,) / (N, 1)) and labels; rows with label -100 are ignored.

  A constant prediction or label column makes Pearson / Spearman / Matthews undefined;
  they are reported as 0.0 then (scikit-learn's convention for Matthews).
  """
  from scipy import stats  # pylint: disable=import-outside-toplevel
  from sklearn import metrics as skm  # pylint: disable=import-outside-toplevel
  info = glue_task_info(task)
  pred = np.asarray(predictions)
  label = np.asarray(labels)
  if pred.ndim == 2:
    pred = pred[:, 0] if info.is_regression else pred.argmax(-1)
  keep = label != IGNORE_INDEX
  pred, label = pred[keep], label[keep]
  out: dict[str, float] = {}
  if info.is_regression:
    pred, label = pred.astype(np.float64), label.astype(np.float64)
    if len(label) < 2 or np.ptp(pred) == 0 or np.ptp(label) == 0:
      out['pearson'] = out['spearmanr'] = 0.0
    else:
      out['pearson'] = _finite_or_zero(stats.pearsonr(pred, label)[0])
      out['spearmanr'] = _finite_or_zero(stats.spearmanr(pred, label)[0])
  else:
    pred, label = pred.astype(np.int64), label.astype(np.int64)
    out['accuracy'] = float(skm.accuracy_score(label, pred)) if len(label) else 0.0
    if 'f1' in info.metric_names:
      out['f1'] = float(skm.f1_score(label, pred, pos_label=1, average='binary',
                                     zero_division=0.0))
    if 'matthews_correlation' in info.metric_names:
      out['matthews_correlation'] = (float(skm.matthews_corrcoef(label, pred))
                                     if len(label) else 0.0)
  out['score'] = float(np.mean([out[m] for m in info.metric_names]))
  out['metric'] = out['score']
  return out


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
