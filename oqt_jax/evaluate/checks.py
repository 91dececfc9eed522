"""Checks an evaluation makes before any batch is evaluated, and on what it measures: quant
points of this model type, settings that can only fail on this model (traced abstractly), token
ids and lengths, finite parameters and metrics. Each failure is one line naming the field,
batch or file."""
from __future__ import annotations

import ast
import math
from typing import Optional

import jax
import numpy as np

from oqt_jax import quant
from oqt_jax.errors import CheckpointError, ConfigError, DataError
from oqt_jax.quant import points as P
from oqt_jax.train.guards import check_batch, nonfinite_leaves


def model_points(model_type: str) -> tuple[frozenset, frozenset]:
  """(per-layer, global) point names of quant_dict keys for one model type."""
  layer = set(P.LAYER_ACTS[model_type]) | {'L'}
  layer |= {'w' + a for a in P.LAYER_ACTS[model_type] if a in P.WEIGHTED}
  glob = set(P.GLOBAL_ACTS[model_type]) | set(P.TABLES[model_type])
  glob |= {'w' + a for a in P.GLOBAL_ACTS[model_type] if a in P.WEIGHTED}
  return frozenset(layer), frozenset(glob)


def check_quant_points(qcfg, model_type: str, num_layers: Optional[int] = None) -> None:
  """quant_dict keys exist for this model type (and layer indices < num_layers); the
  message lists only this model's points."""
  spec = qcfg.get('quant_dict', '') if hasattr(qcfg, 'get') else ''
  if model_type not in P.LAYER_ACTS or not spec:
    return
  try:
    d = ast.literal_eval(spec.strip()) if isinstance(spec, str) else spec
    d = d.to_dict() if hasattr(d, 'to_dict') else dict(d)
  except Exception:   # not a dict: validate_quant_config says so
    return
  layer, glob = model_points(model_type)
  field = 'quant.quant_dict'
  for key in d:
    m = P.KEY_RE.match(str(key))
    base, idx = (m.group(1), m.group(2)) if m else (str(key), None)
    if base in layer:
      if idx is not None and num_layers is not None and int(idx) >= num_layers:
        raise ConfigError(f'{field}: point {key!r}: the {model_type} model has {num_layers} '
                          f'layers (0..{num_layers - 1})')
    elif base in glob:
      if idx is not None:
        raise ConfigError(f'{field}: point {key!r}: {base!r} is not a per-layer point')
    else:
      raise ConfigError(f'{field}: unknown point {key!r} for {model_type} (known: '
                        f'{", ".join(sorted(layer | glob))}, per-layer ones with an optional '
                        'layer index)')


def check_quant_for_model(qcfg, model, variables) -> None:
  """Settings of the quant config `qcfg` (resolved, else validated here) that can only fail on
  this model (unknown points, PEG groups that do not divide a point's width) as ConfigError
  now, before any evaluation: the calibration's first pass is traced abstractly (no
  computation)."""
  qcfg = quant.resolved(qcfg)
  check_quant_points(qcfg, model.cfg.model_type, model.cfg.num_layers)
  try:
    hooks = quant.hooks(qcfg, model.cfg)
    init_model = model.clone(quant=hooks.with_mode('init'))
  except ConfigError:
    raise
  except Exception:   # calibration reports anything else itself
    return
  ids = jax.ShapeDtypeStruct((1, 8), np.int32)
  inputs = {'input_ids': ids, 'attention_mask': ids}
  params = {k: v for k, v in dict(variables).items() if k == 'params'}
  try:
    jax.eval_shape(lambda v, i: init_model.apply(v, **i, mutable=['quant']), params, inputs)
  except ConfigError:
    raise
  except Exception:
    return


def checked(batches, model, where: str):
  """`batches`, each checked first (token ids inside the vocabulary, sequences no longer
  than the position table): a DataError instead of NaN from an out-of-range lookup."""
  for i, b in enumerate(batches):
    check_batch(b, model.cfg.vocab_size, model.cfg.max_position_embeddings, f'{where} {i}')
    yield b


def check_finite_params(variables, source) -> None:
  bad = nonfinite_leaves(variables.get('params', variables))
  if bad:
    raise CheckpointError(f'{source}: non-finite parameters ({bad[0]}; {len(bad)} array(s) '
                          'with NaN or Inf): nothing to evaluate')


def check_finite_metrics(metrics, source, what='model') -> None:
  """DataError when no token was evaluated; CheckpointError when the model's loss or
  activation statistics are NaN / Inf (never reported as numbers)."""
  loss = metrics.get('loss')
  if loss is not None and not metrics.get('num_tokens'):
    raise DataError('validation split: the evaluation batches have no valid (non-padding) '
                    'tokens')
  if loss is not None and not math.isfinite(loss):
    raise CheckpointError(f'{source}: the {what} gives a non-finite evaluation loss ({loss}): '
                          'its activations overflow on this data')
  for k in ('max_inf_norm', 'max_inf_norm_any'):
    v = metrics.get(k)
    if isinstance(v, float) and not math.isfinite(v):
      raise CheckpointError(f'{source}: the {what} has non-finite activation statistics '
                            f'({k} {v})')
