"""GLUE metrics and evaluation of a sequence-classification model: oqt_jax/train/glue_eval.py
(training's periodic evaluation runs it too), importable from here as before.

  m = glue_metrics('mrpc', logits_or_class_ids, labels)     # {'accuracy', 'f1', 'score', 'metric'}
  m = evaluate_glue(model, variables, config, batches)      # the same from a model's forward
  sets = glue_datasets(config, workdir, val)                # the dev sets eval.py scores
  out = glue_report(model, variables, config, sets, batch_size)   # printed, and returned
"""
from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from oqt_jax import data
from oqt_jax.train.glue_eval import (IGNORE_INDEX, MODEL_INPUTS, _forward,  # noqa: F401
                                     evaluate_glue, format_glue, glue_metrics, glue_task_info,
                                     loss_of, predict)


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
      batches = tqdm(batches, total=ds.num_eval_batches(batch_size),
                     desc=f'{prefix}GLUE {split}', unit='batch')
    m = evaluate_glue(model, variables, config, batches)
    print(format_glue(m, prefix=f'{prefix}{split} '))
    if split == 'validation':
      out.update(m)
    else:
      out[split] = m
  return out
