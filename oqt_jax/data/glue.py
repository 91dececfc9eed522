"""GLUE sequence classification / regression: task table, loading, batches and metrics.

Data: `datasets.load_dataset('nyu-mll/glue', task)`, or, when `data.hub_name` is set, that
hub name or local folder (a `DatasetDict.save_to_disk` with the task's columns and 'label'),
or, when `data.files` is set, a folder holding the task's files: the GLUE TSVs as distributed
(train.tsv, dev.tsv; MNLI dev_matched.tsv / dev_mismatched.tsv; CoLA without a header) or
JSONL files with the hub's column names (train.jsonl, validation.jsonl; MNLI
validation_matched.jsonl / validation_mismatched.jsonl). Split 'validation' is the dev set
(MNLI: matched); 'validation_mismatched' is MNLI's mismatched dev set.
Sequences are "[CLS] A [SEP]" or "[CLS] A [SEP] B [SEP]" (BERT; OPT: "</s> A </s> B"),
truncated and padded to data.max_seq_length. Labels: int32 class ids, float32 for stsb.
Eval batches fill their last batch with rows labelled -100 (to be ignored; also for stsb).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from oqt_jax import hub
from oqt_jax.data import cache, sampling
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


# --------------------------------------------------------------------------- local files
# The GLUE TSVs as distributed (the GLUE download script's folders): per task, whether the
# file has a header, and where the sentences and the label are (header names, or column
# indices for CoLA, whose train / dev files have no header: source, label, original label,
# sentence). String labels map to the hub's class ids.
@dataclasses.dataclass(frozen=True)
class TsvFormat:
  header: bool
  columns: tuple                # (sentence1, sentence2 or None, label): names or indices
  label_map: tuple = ()         # ((string, class id), ...); () = the label is a number


_NLI3 = (('entailment', 0), ('neutral', 1), ('contradiction', 2))
_NLI2 = (('entailment', 0), ('not_entailment', 1))
TSV_FORMATS = {
    'cola': TsvFormat(False, (3, None, 1)),
    'sst2': TsvFormat(True, ('sentence', None, 'label')),
    'mrpc': TsvFormat(True, ('#1 String', '#2 String', 'Quality')),
    'qqp': TsvFormat(True, ('question1', 'question2', 'is_duplicate')),
    'stsb': TsvFormat(True, ('sentence1', 'sentence2', 'score')),
    'mnli': TsvFormat(True, ('sentence1', 'sentence2', 'gold_label'), _NLI3),
    'qnli': TsvFormat(True, ('question', 'sentence', 'label'), _NLI2),
    'rte': TsvFormat(True, ('sentence1', 'sentence2', 'label'), _NLI2),
    'wnli': TsvFormat(True, ('sentence1', 'sentence2', 'label')),
}
# split (as asked by the pipeline or the hub's name) -> (TSV file stem, JSONL file stem)
_LOCAL_SPLITS = {'train': ('train', 'train'), 'validation': ('dev', 'validation'),
                 'validation_matched': ('dev_matched', 'validation_matched'),
                 'validation_mismatched': ('dev_mismatched', 'validation_mismatched'),
                 'test': ('test', 'test')}


def local_files(task: str, split: str) -> tuple[str, str]:
  """(TSV name, JSONL name) of `split` of `task` in a data.files folder; MNLI's
  'validation' is the matched dev set."""
  info = glue_task_info(task)
  want = _split_name(info, split)
  if want not in _LOCAL_SPLITS:
    raise DataError(f"data.files: no local file name for split {split!r} of {task}")
  tsv, jsonl = _LOCAL_SPLITS[want]
  return tsv + '.tsv', jsonl + '.jsonl'


def _label_value(raw: str, fmt: TsvFormat, info: GlueTask, where: str):
  raw = raw.strip()
  if fmt.label_map:
    table = dict(fmt.label_map)
    if raw not in table:
      raise DataError(f"{where}: label {raw!r} is not one of {', '.join(table)}")
    return table[raw]
  try:
    value = float(raw) if info.is_regression else int(raw)
  except ValueError:
    raise DataError(f'{where}: label {raw!r} is not a number') from None
  return _checked_label(value, info, where)


def _checked_label(value, info: GlueTask, where: str):
  """A class label inside the task's label set (0..num_labels-1), a finite regression
  target; DataError naming the file and row otherwise."""
  import math  # pylint: disable=import-outside-toplevel
  if info.is_regression:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
        not math.isfinite(value):
      raise DataError(f'{where}: label {value!r} is not a finite number ({info.name} is a '
                      'regression task)')
    return float(value)
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or \
      not 0 <= value < info.num_labels:
    raise DataError(f'{where}: label {value!r} is outside the {info.name} label set '
                    f'(0..{info.num_labels - 1})')
  return value


def read_glue_tsv(path: str, task: str) -> dict[str, list]:
  """Rows of a GLUE TSV as distributed, as columns with the hub's names + 'label'.

  Read without quote processing (GLUE sentences contain unbalanced quotes); rows with too
  few fields (a few broken lines of QQP's train.tsv) are skipped with a warning.
  """
  import csv  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  info = glue_task_info(task)
  fmt = TSV_FORMATS[info.name]
  k1, k2 = info.sentence_keys
  cols: dict[str, list] = {k1: [], 'label': []}
  if k2:
    cols[k2] = []
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
  skipped = 0
  try:
    with open(path, encoding='utf-8-sig', newline='') as f:
      reader = csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE)
      if fmt.header:
        header = next(reader, None)
        if header is None:
          raise DataError(f"data.files: '{path}' is empty")
        header = [h.strip() for h in header]
        idx = []
        for name in fmt.columns:
          if name is None:
            idx.append(None)
          elif name not in header:
            raise DataError(f"data.files: '{path}' has no column '{name}' for task {task} "
                            f"(header: {', '.join(header)})")
          else:
            idx.append(header.index(name))
      else:
        idx = list(fmt.columns)
      need = max(i for i in idx if i is not None) + 1
      for lineno, row in enumerate(reader, start=2 if fmt.header else 1):
        if not row or (len(row) == 1 and not row[0].strip()):
          continue
        if len(row) < need:
          skipped += 1
          continue
        where = f"data.files: '{path}' line {lineno}"
        cols[k1].append(row[idx[0]])
        if k2:
          cols[k2].append(row[idx[1]])
        cols['label'].append(_label_value(row[idx[2]], fmt, info, where))
  except UnicodeDecodeError as e:
    raise DataError(f"data.files: cannot decode '{path}' as UTF-8 ({e.reason} at byte "
                    f'{e.start})') from None
  except OSError as e:
    raise DataError(f"data.files: cannot read '{path}' ({e.strerror or e})") from None
  if skipped:
    import logging  # pylint: disable=import-outside-toplevel
    logging.getLogger(__name__).warning('%s: skipped %d rows with fewer than %d fields',
                                        path, skipped, need)
  return cols


def read_glue_jsonl(path: str, task: str) -> dict[str, list]:
  """Rows of a JSONL file with the hub's column names (one JSON object a line)."""
  import json  # pylint: disable=import-outside-toplevel
  info = glue_task_info(task)
  keys = [k for k in info.sentence_keys if k] + ['label']
  cols: dict[str, list] = {k: [] for k in keys}
  try:
    with open(path, encoding='utf-8') as f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"data.files: '{path}' line {lineno}: not JSON ({e.msg})") from None
        for k in keys:
          if not isinstance(row, dict) or k not in row:
            raise DataError(f"data.files: '{path}' line {lineno}: no field '{k}' for task "
                            f'{task}')
          cols[k].append(row[k] if k != 'label' else _checked_label(
              row[k], info, f"data.files: '{path}' line {lineno}"))
  except UnicodeDecodeError as e:
    raise DataError(f"data.files: cannot decode '{path}' as UTF-8 ({e.reason} at byte "
                    f'{e.start})') from None
  except OSError as e:
    raise DataError(f"data.files: cannot read '{path}' ({e.strerror or e})") from None
  return cols


def check_local_files(data_config) -> None:
  """source=glue with a data.files folder: the dev split the task is scored on (MNLI: the
  matched one) is there, so a run does not stop at its first evaluation; DataError naming
  the missing file otherwise. (The train split is read first thing.)"""
  if data_config.get('source', '') != 'glue' or not str(data_config.get('files', '')).strip():
    return
  glue_task_info(data_config.get('glue_task', ''))
  local_glue_path(data_config, 'validation')


def local_glue_path(data_config, split: str) -> str:
  """The file of `split` in the data.files folder: the TSV if present, else the JSONL."""
  info = glue_task_info(data_config.get('glue_task', ''))
  folder = os.path.expanduser(str(data_config.get('files', '')))
  if not os.path.isdir(folder):
    raise DataError(f"data.files='{folder}': not a directory (for source=glue it is the "
                    f"folder of the task's train.tsv / dev.tsv or train.jsonl / "
                    'validation.jsonl)')
  tsv, jsonl = local_files(info.name, split)
  for name in (tsv, jsonl):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise DataError(f"data.files: no {os.path.join(folder, tsv)} (nor {jsonl}) for the "
                  f'{info.name} {split} split')


def load_local_glue_split(data_config, split: str):
  """A GLUE split from the data.files folder, as a datasets.Dataset with the hub's columns."""
  import datasets  # pylint: disable=import-outside-toplevel
  info = glue_task_info(data_config.get('glue_task', ''))
  path = local_glue_path(data_config, split)
  cols = (read_glue_tsv(path, info.name) if path.endswith('.tsv')
          else read_glue_jsonl(path, info.name))
  if not cols['label']:
    raise DataError(f"data.files: '{path}' has no rows")
  return datasets.Dataset.from_dict(cols)


def load_glue_split(data_config, split: str):
  """The raw rows (datasets.Dataset) of a GLUE split; 'validation' = the task's dev split.

  From data.files (a folder of the task's TSVs or JSONL files) when set, else the hub."""
  info = glue_task_info(data_config.get('glue_task', ''))
  if str(data_config.get('files', '') or '').strip():
    return load_local_glue_split(data_config, split)
  name = data_config.get('hub_name', '') or GLUE_HUB_NAME
  field = 'data.hub_name' if data_config.get('hub_name', '') else f'data.glue_task={info.name}'
  dd = hub.load_hf(name, data_config.get('hub_config', '') or info.name, field,
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
  files = str(data_config.get('files', '') or '').strip()
  if files:
    path = local_glue_path(data_config, split)
    st = os.stat(path)
    fields['local_file'] = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    return fields
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


def _finite_or_zero(x) -> float:
  x = float(x)
  return x if np.isfinite(x) else 0.0


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
  """The task's metrics (the GLUE benchmark's, listed in oqt_jax/train/glue_eval.py) from
  predictions (class ids, logits (N, C), or regression floats (N,) / (N, 1)) and labels;
  rows with label -100 are ignored.

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
