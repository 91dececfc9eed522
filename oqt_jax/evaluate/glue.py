"""GLUE metrics and evaluation of a sequence-classification model: oqt_jax/train/glue_eval.py
(training's periodic evaluation runs it too), importable from here as before.

  m = glue_metrics('mrpc', logits_or_class_ids, labels)     # {'accuracy', 'f1', 'score', 'metric'}
  m = evaluate_glue(model, variables, config, batches)      # the same from a model's forward
"""
from oqt_jax.train.glue_eval import (IGNORE_INDEX, MODEL_INPUTS, _forward,  # noqa: F401
                                     evaluate_glue, format_glue, glue_metrics, glue_task_info,
                                     loss_of, predict)
