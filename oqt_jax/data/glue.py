"""GLUE sequence classification / regression: task table, loading, batches and metrics.

Data: `datasets.load_dataset('nyu-mll/glue', task)`, or, when `data.hub_name` is set, that
hub name or local folder (a `DatasetDict.save_to_disk` with the task's columns and 'label').
Sequences are "[CLS] A [SEP]" or "[CLS] A [SEP] B [SEP]" (BERT; OPT: "</s> A </s> B"),
truncated and padded to data.max_seq_length. Labels: int32 class ids, float32 for stsb.
Eval batches fill their last batch with rows labelled -100 (to be ignored; also for stsb).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from oqt_jax.data import cache, sampling, sources
from oqt_jax.data import tokenizer as tokenizer_lib
from oqt_jax.errors import ConfigError, DataError

GLUE_HUB_NAME = 'nyu-mll/glue'
IGNORE_INDEX = -100
_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """What a fine-tuning loop needs to know about a GLUE task."""
  name: str
  sentence_keys: tuple          # (key1, key2) or (key1, None)
  num_labels: int               # 1 = regression
  is_regression: bool
  metric_names: tuple           # keys of glue_metrics(...) reported for the task
  validation_split: str         # the dev split ('validation_matched' for mnli)


GLUE_TASKS = {
    'cola': GlueTask('cola', ('sentence', None), 2, False, ('matthews_correlation',),
                     'validation'),
    'sst2': GlueTask('sst2', ('sentence', None), 2, False, ('accuracy',), 'validation'),
    'mrpc': GlueTask('mrpc', ('sentence1', 'sentence2'), 2, False, ('accuracy', 'f1'),
                     'validation'),
    'qqp': GlueTask('qqp', ('question1', 'question2'), 2, False, ('accuracy', 'f1'),
                    'validation'),
    'stsb': GlueTask('stsb', ('sentence1', 'sentence2'), 1, True, ('pearson', 'spearmanr'),
                     'validation'),
    'mnli': GlueTask('mnli', ('premise', 'hypothesis'), 3, False, ('accuracy',),
                     'validation_matched'),
    'qnli': GlueTask('qnli', ('question', 'sentence'), 2, False, ('accuracy',), 'validation'),
    'rte': GlueTask('rte', ('sentence1', 'sentence2'), 2, False, ('accuracy',), 'validation'),
    'wnli': GlueTask('wnli', ('sentence1', 'sentence2'), 2, False, ('accuracy',),
                     'validation'),
}


def glue_task_info(task: str) -> GlueTask:
  if task not in GLUE_TASKS:
    raise ConfigError(f'data.glue_task={task!r}: unknown; expected one of '
                      f'{", ".join(GLUE_TASKS)}')
  return GLUE_TASKS[task]


def _split_name(info: GlueTask, split: str) -> str:
  return info.validation_split if split == 'validation' else split


def load_glue_split(data_config, split: str):
  """The raw rows (datasets.Dataset) of a GLUE split; 'validation' = the task's dev split."""
  info = glue_task_info(data_config.get('glue_task', ''))
  name = data_config.get('hub_name', '') or GLUE_HUB_NAME
  field = 'data.hub_name' if data_config.get('hub_name', '') else f'data.glue_task={info.name}'
  dd = sources.load_hf(name, data_config.get('hub_config', '') or info.name, field,
                       data_config.get('cache_dir', ''))
  want = _split_name(info, split)
  import datasets  # pylint: disable=import-outside-toplevel
  if isinstance(dd, datasets.Dataset):
    raise DataError(f"{field}='{name}': a single dataset; GLUE needs a DatasetDict with "
                    f"'train' and '{info.validation_split}'")
  if want not in dd:
    raise DataError(f"{field}='{name}': has no '{want}' split (splits: {', '.join(dd)})")
  ds = dd[want]
  for col in [k for k in info.sentence_keys if k] + ['label']:
    if col not in ds.column_names:
      raise DataError(f"{field}='{name}': the {want} split has no column '{col}' for "
                      f'task {info.name} (columns: {", ".join(ds.column_names)})')
  if len(ds) == 0:
    raise DataError(f"{field}='{name}': the {want} split is empty")
  return ds


def glue_sentences(data_config, split: str) -> list[str]:
  """All sentences of a split (both columns of pair tasks), for tokenizer training."""
  info = glue_task_info(data_config.get('glue_task', ''))
  ds = load_glue_split(data_config, split)
  out: list[str] = []
  for key in info.sentence_keys:
    if key:
      out.extend(s for s in ds[key] if s and s.strip())
  return out


def _tokenize(ds, info: GlueTask, tok, max_len: int, with_types: bool) -> dict:
  k1, k2 = info.sentence_keys
  dtype = cache.token_dtype(len(tok))
  ids, masks, types = [], [], []
  for i in range(0, len(ds), _CHUNK):
    rows = ds[i:i + _CHUNK]
    enc = tok(rows[k1], rows[k2] if k2 else None, truncation=True, max_length=max_len,
              padding='max_length', return_token_type_ids=with_types, verbose=False)
    ids.append(np.asarray(enc['input_ids'], dtype))
    masks.append(np.asarray(enc['attention_mask'], np.int8))
    if with_types:
      types.append(np.asarray(enc['token_type_ids'], np.int8))
  labels = np.asarray(ds['label'], np.float32 if info.is_regression else np.int32)
  out = {'input_ids': np.concatenate(ids), 'attention_mask': np.concatenate(masks),
         'labels': labels}
  if with_types:
    out['token_type_ids'] = np.concatenate(types)
  return out


class GlueDataset(sampling.IndexedDataset):
  """Tokenized GLUE split. Attributes: task_info, num_labels, is_regression, metric_names,
  num_examples, seq_len."""

  def __init__(self, arrays: dict, info: GlueTask, seed: int, seq_len: int):
    self.arrays = arrays
    self.task_info = info
    self.num_labels = info.num_labels
    self.is_regression = info.is_regression
    self.metric_names = info.metric_names
    self.seed = int(seed)
    self.seq_len = int(seq_len)
    self.num_examples = int(len(arrays['labels']))

  def __len__(self) -> int:
    return self.num_examples

  def rows(self, indices) -> dict[str, np.ndarray]:
    idx = np.asarray(indices, np.int64).reshape(-1)
    return {k: np.asarray(v[idx]).astype(
        np.float32 if (k == 'labels' and self.is_regression) else np.int32)
            for k, v in self.arrays.items()}

  def batch(self, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    return self.rows(self.batch_indices(step, batch_size, process_index, process_count))

  def _eval_rows(self, indices, valid) -> dict[str, np.ndarray]:
    out = self.rows(indices)
    out['labels'][~valid] = IGNORE_INDEX
    return out


def _glue_key_fields(data_config, split: str) -> dict:
  name = os.path.expanduser(data_config.get('hub_name', '') or '')
  fields = {'task': data_config.get('glue_task', ''), 'split': split, 'hub_name': name,
            'hub_config': data_config.get('hub_config', '')}
  if name and os.path.isdir(name):
    fields['local_files'] = sorted(
        (os.path.relpath(os.path.join(root, f), name), st.st_size, st.st_mtime_ns)
        for root, _, files in os.walk(name) for f in files
        for st in [os.stat(os.path.join(root, f))])
  return fields


def build_glue_dataset(config, tok, split: str, workdir: str | None = None) -> GlueDataset:
  d = config.data
  info = glue_task_info(d.get('glue_task', ''))
  max_len = int(d.get('max_seq_length', 128))
  with_types = config.model.get('model_type', 'bert') == 'bert'
  key = cache.cache_key({'what': 'glue', 'max_len': max_len, 'types': with_types,
                         'tokenizer': tokenizer_lib.tokenizer_fingerprint(tok),
                         **_glue_key_fields(d, split)})
  arrays = cache.load(workdir, key)
  if arrays is None:
    arrays = _tokenize(load_glue_split(d, split), info, tok, max_len, with_types)
    arrays = cache.save(workdir, key, arrays, {'task': info.name, 'split': split})
  return GlueDataset(arrays, info, config.get('seed', 0), max_len)


# --------------------------------------------------------------------------- metrics


def _rank(x: np.ndarray) -> np.ndarray:
  """Ranks with ties averaged (as scipy.stats.rankdata)."""
  _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
  start = np.cumsum(counts) - counts
  return (start + (counts - 1) / 2.0)[inv]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a - a.mean(), b - b.mean()
  den = np.sqrt((a * a).sum() * (b * b).sum())
  return float((a * b).sum() / den) if den > 0 else 0.0


def _matthews(pred: np.ndarray, label: np.ndarray) -> float:
  classes = np.union1d(pred, label)
  c = np.zeros((len(classes), len(classes)))
  np.add.at(c, (np.searchsorted(classes, label), np.searchsorted(classes, pred)), 1)
  t, p, n = c.sum(1), c.sum(0), c.sum()
  num = np.trace(c) * n - (t * p).sum()
  den = np.sqrt((n * n - (p * p).sum()) * (n * n - (t * t).sum()))
  return float(num / den) if den > 0 else 0.0


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
  """The task's metrics. predictions: class ids, logits (N, C) or (regression) floats.

  Rows with label -100 (padding rows of eval_batches) are ignored. Adds 'score', the mean of
  the task's metrics (the per-task figure of a GLUE average).
  """
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
    out['pearson'] = _pearson(pred, label)
    out['spearmanr'] = _pearson(_rank(pred), _rank(label))
  else:
    pred, label = pred.astype(np.int64), label.astype(np.int64)
    out['accuracy'] = float((pred == label).mean()) if len(label) else 0.0
    if 'f1' in info.metric_names:
      tp = float(((pred == 1) & (label == 1)).sum())
      fp = float(((pred == 1) & (label != 1)).sum())
      fn = float(((pred != 1) & (label == 1)).sum())
      out['f1'] = tp / (tp + 0.5 * (fp + fn)) if tp + fp + fn > 0 else 0.0
    if 'matthews_correlation' in info.metric_names:
      out['matthews_correlation'] = _matthews(pred, label)
  out['score'] = float(np.mean([out[m] for m in info.metric_names]))
  return out
