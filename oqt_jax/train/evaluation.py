"""Periodic evaluation during training: `evaluate(state, config, ds) -> dict`.

This is the hook the training loop calls every `eval_every_steps` and at the end; whatever
keys it returns are written to TensorBoard and metrics.jsonl (kind 'eval'). It computes the
validation loss (the head's loss: MLM or CLM, see losses.py), perplexity = exp(loss), and the
paper's outlier figures (max_inf_norm, avg_kurtosis, max_kurtosis; outlier_stats.py).

Extending it: add a function with the signature of `_eval_metrics`
below to EVAL_METRIC_FNS (or call `register_eval_metrics(fn)`); each gets
(state, config, ds, batches, mesh) and returns a dict merged into the result. `batches` is a
list of this process's host (numpy) eval batches, padded to a fixed shape so every jitted
function compiles once; `device_eval_batch(b, mesh)` turns one into global device arrays.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from oqt_jax import models
from oqt_jax.data.sampling import BATCH_KEYS, PAD_VALUES, pad_batch  # noqa: F401
from oqt_jax.errors import ConfigError
from oqt_jax.quant.methods import qat
from oqt_jax.train import glue_eval, outlier_stats
from oqt_jax.train import sharding as shd

def mesh_of(tree) -> Mesh:
  for leaf in jax.tree.leaves(tree):
    sh = getattr(leaf, 'sharding', None)
    if hasattr(sh, 'mesh'):
      return sh.mesh
  raise ValueError('cannot find a mesh: pass mesh=')


def eval_batches(config, ds, batch_size: Optional[int] = None,
                 num_batches: Optional[int] = None) -> list[dict[str, np.ndarray]]:
  """This process's rows of the eval batches (global size `batch_size`, default
  config.eval_batch_size), padded to a fixed row count so each jitted function compiles once.
  Padding rows have attention_mask 0 and labels -100."""
  pc, pi = jax.process_count(), jax.process_index()
  bs = int(batch_size or config.eval_batch_size)
  if bs % pc:
    raise ConfigError(f'eval_batch_size={bs}: must be divisible by the {pc} processes')
  n = config.get('num_eval_batches', 0) if num_batches is None else num_batches
  n = None if not n or n <= 0 else int(n)
  local = bs // pc
  it = (ds.eval_batches(local, num_batches=n) if pc == 1 else
        ds.eval_batches(local, num_batches=n, process_index=pi, process_count=pc))
  return [pad_batch(b, local) for b in it]


def device_eval_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host eval batch (this process's rows) -> global arrays: sharded over (data, fsdp) when
  the global batch divides evenly, else replicated (single process only)."""
  rows = next(iter(batch.values())).shape[0] * jax.process_count()
  if rows % shd.batch_shards(mesh) == 0:
    return shd.global_batch(batch, mesh, global_shape_dim0=rows)
  if jax.process_count() > 1:
    raise ConfigError(f'eval_batch_size={rows}: must be divisible by data*fsdp='
                      f'{shd.batch_shards(mesh)} in a multi-process run')
  return shd.replicated_batch(batch, mesh)


def eval_model(state, config):
  """(model, variables) that periodic evaluation measures: the model of config.model with the
  state's parameters; during QAT (a state with a `quant` collection) the quantized model being
  trained, its learned ranges frozen, so every metric is the quantized model's."""
  model = models.build(models.from_config(config.model))
  variables = {'params': state.params}
  if getattr(state, 'quant', None) is not None:
    model = model.clone(quant=qat.train_hooks(config, model.cfg).with_mode('frozen'))
    variables['quant'] = state.quant
  return model, variables


def _eval_metrics(state, config, ds, batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh
                  ) -> dict[str, Any]:
  """Validation loss / perplexity and the paper's outlier figures, from one forward a batch
  (the jitted step of oqt_jax/train/outlier_stats.py, which uses the training loss)."""
  model, variables = eval_model(state, config)
  step_fn = outlier_stats.make_eval_step(model, return_tensors=False)
  acc, n = None, 0
  with shd.activation_context(mesh):   # traced on the first call: the constraints apply
    for b in batches:
      sums, _ = step_fn(variables, device_eval_batch(b, mesh))
      acc = outlier_stats.accumulate(acc, sums)
      n += 1
  if acc is None:
    return {}
  m = outlier_stats.finalize(acc, model.cfg.model_type, model.cfg.num_layers)
  loss = m['loss'] if m['loss'] is not None else float('nan')
  return {'eval_loss': loss, 'eval_perplexity': math.exp(loss) if loss < 700 else float('inf'),
          'eval_tokens': m['num_tokens'], 'eval_batches': n,
          'max_inf_norm': m['max_inf_norm'], 'avg_kurtosis': m['avg_kurtosis'],
          'max_kurtosis': m['max_kurtosis']}


def _glue_eval_metrics(state, config, ds, batches, mesh: Mesh) -> dict[str, Any]:
  """GLUE runs (a dataset with task_info): the task's metrics on the dev batches
  (glue_task, glue_metric = the headline score, and glue_<name> for each metric); during QAT
  those of the quantized model, as the eval loss."""
  if getattr(ds, 'task_info', None) is None:
    return {}
  model, variables = eval_model(state, config)
  with shd.activation_context(mesh):
    m = glue_eval.evaluate_glue(model, variables, config, batches)
  out: dict[str, Any] = {'glue_task': m['task'], 'glue_metric': m['metric']}
  out.update({f'glue_{k}': m[k] for k in ds.task_info.metric_names})
  return out


EVAL_METRIC_FNS: list[Callable[..., dict]] = [_eval_metrics, _glue_eval_metrics]


def register_eval_metrics(fn: Callable[..., dict]) -> Callable[..., dict]:
  """Add fn(state, config, ds, batches, mesh) -> dict to what `evaluate` reports."""
  if fn not in EVAL_METRIC_FNS:
    EVAL_METRIC_FNS.append(fn)
  return fn


def evaluate(state, config, ds, *, num_batches: Optional[int] = None,
             batch_size: Optional[int] = None, mesh: Optional[Mesh] = None) -> dict[str, Any]:
  """Validation metrics of `state` on `ds` (eval_loss, eval_perplexity, eval_tokens, ...).

  state: a TrainState (uses .params and .apply_fn); config: the run's config (model fields
  as trained, e.g. vocab_size after the tokenizer); ds: a dataset with
  `eval_batches(batch_size, num_batches)`; num_batches defaults to config.num_eval_batches
  (<= 0: the whole validation split).
  """
  mesh = mesh or mesh_of(state.params)
  batches = eval_batches(config, ds, batch_size, num_batches)
  out: dict[str, Any] = {}
  for fn in EVAL_METRIC_FNS:
    out.update(fn(state, config, ds, batches, mesh))
  return out
