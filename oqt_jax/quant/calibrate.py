"""Post-training calibration: from a floating-point model to a quantized one.

  qmodel, qvariables = calibrate(model, variables, batches, qcfg)
  out = qmodel.apply(qvariables, input_ids, attention_mask=mask)

Steps, each one jitted function compiled once:
  1. init: every point's state is created in the 'quant' collection; weight ranges are
     computed from the weights (their estimator, e.g. MSE grid), no data needed;
  2. permutation pass (only when some point uses 'ngpK'): the floating-point model runs over
     the calibration batches collecting each dim's range (max - min over the batch's valid
     tokens) of the points the permutations are measured on, averaged over the batches; each
     permuted point then gets group ids from its source's ranges sorted ascending (x, h and y
     of a layer share h's with quant.permute_shared_h, also when h itself stays fp32);
  3. range estimation: `est_num_batches` batches with the estimators updating (the model
     quantizes with the current estimates while it runs, as the original), padding masked;
  4. freeze: the returned model's hooks read the ranges ('dynamic' = quant.dynamic: the
     activation ranges come from each batch instead, step 3 is skipped).
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oqt_jax.quant import quantizers
from oqt_jax.quant.hooks import COLLECTION, QuantHooks
from oqt_jax.quant.points import resolved

MODEL_INPUTS = {'bert': ('input_ids', 'attention_mask', 'token_type_ids'),
                'opt': ('input_ids', 'attention_mask')}


def model_inputs(model, batch) -> dict:
  """The model's keyword inputs from a batch dict (or an input_ids array)."""
  if not isinstance(batch, Mapping):
    return {'input_ids': jnp.asarray(batch)}
  keys = MODEL_INPUTS[model.cfg.model_type]
  return {k: jnp.asarray(batch[k]) for k in keys if k in batch and batch[k] is not None}


def strip(variables) -> dict:
  """Variables without the 'quant' and 'intermediates' collections."""
  variables = flax.core.unfreeze(variables) if isinstance(variables, flax.core.FrozenDict) \
      else dict(variables)
  return {k: v for k, v in variables.items() if k not in (COLLECTION, 'intermediates')}


@functools.lru_cache(maxsize=32)
def _step_fn(model, hooks: QuantHooks, mode: str):
  """jit(variables, quant_state, inputs) -> updated 'quant' collection; cached per model/mode."""
  m = model.clone(quant=hooks.with_mode(mode))

  def step(variables, quant_state, inputs):
    v = dict(variables)
    if quant_state is not None:
      v[COLLECTION] = quant_state
    _, upd = m.apply(v, **inputs, mutable=[COLLECTION])
    return upd[COLLECTION]
  return jax.jit(step)


STATE_KEYS = ('x_min', 'x_max', 'n', 'group_ids', 'fp')


def point_states(tree, prefix=()) -> dict:
  """{point name: path} of every point state in a 'quant' collection: a dict holding any of
  STATE_KEYS directly (its own nested 'fp' statistics are part of it, not a point)."""
  out = {}
  for k, v in tree.items():
    if not isinstance(v, Mapping):
      continue
    if any(key in v for key in STATE_KEYS):
      out.setdefault(k, prefix + (k,))
    else:
      for name, path in point_states(v, prefix + (k,)).items():
        out.setdefault(name, path)
  return out


def assign_permutations(quant_state, rules) -> dict:
  """Writes 'group_ids' of every permuted point from its source point's FP per-dim ranges
  (the mean over the calibration batches of each batch's max - min). The source may itself
  be unquantized (e.g. h kept in fp32 with quant.permute_shared_h): it is still observed."""
  tree = flax.core.unfreeze(quant_state)
  points = point_states(tree)
  flat = dict(traverse_util.flatten_dict(tree, keep_empty_nodes=True))
  for name, prefix in points.items():
    if name.startswith('in_'):   # int8 matmul input ranges
      continue
    spec = rules.spec(name)
    if not (spec.enabled and spec.permute and prefix + ('group_ids',) in flat):
      continue
    src = points.get(spec.perm_source)
    if src is None or src + ('fp', 'range') not in flat:
      raise ValueError(f'permutation source {spec.perm_source!r} of {name!r} was not observed')
    perm = quantizers.peg_permutation(flat[src + ('fp', 'range')], spec.n_groups)
    flat[prefix + ('group_ids',)] = quantizers.group_index(perm.shape[0], spec.n_groups, perm)
  return traverse_util.unflatten_dict(flat)


def calibrate(model, variables, batches: Iterable[Any], qcfg, *, num_batches=None,
              progress: bool = False, int8_backend: str = 'aqt'):
  """Calibrates `model` (any oqt_jax.models.build model) on `batches`; returns (qmodel, qvars).

  Args:
    model: a floating-point model module (its `quant` is replaced).
    variables: its variables ({'params': ...}); other collections are kept.
    batches: iterable of dicts with input_ids, attention_mask (token_type_ids for BERT) or
      of input_ids arrays. The first `num_batches` (default qcfg.est_num_batches) are used.
    qcfg: a quant ConfigDict (quant.config(...) or config.quant) or a full config.
    progress: show a tqdm bar.
  Returns:
    (qmodel, qvariables): qmodel = model.clone(quant=QuantHooks(...frozen|dynamic)),
    qvariables = variables + the calibrated 'quant' collection.
  """
  qcfg = resolved(qcfg)
  hooks = QuantHooks.build(qcfg, model.cfg, int8_backend=int8_backend)
  n = int(num_batches or qcfg.get('est_num_batches', 16))
  cal = [model_inputs(model, b) for b in itertools.islice(iter(batches), n)]
  if not cal:
    raise ValueError('calibrate: no calibration batches')
  base = strip(variables)
  fp_model = model.clone(quant=None)

  quant_state = _step_fn(fp_model, hooks, 'init')(base, None, cal[0])
  if hooks.rules.needs_permutation:
    stats = _step_fn(fp_model, hooks, 'stats')
    for b in _progress(cal, progress, 'permutation pass'):
      quant_state = stats(base, quant_state, b)
    quant_state = assign_permutations(quant_state, hooks.rules)
  if hooks.eval_mode == 'frozen':
    step = _step_fn(fp_model, hooks, 'calibrating')
    for b in _progress(cal, progress, 'calibration'):
      quant_state = step(base, quant_state, b)
  qmodel = model.clone(quant=hooks.with_mode(hooks.eval_mode))
  qvariables = dict(base, **{COLLECTION: quant_state})
  for k, v in dict(variables).items():   # keep other collections (not intermediates)
    if k not in qvariables and k != 'intermediates':
      qvariables[k] = v
  return qmodel, qvariables


def _progress(items, on, desc):
  if not on:
    return items
  from tqdm.auto import tqdm
  return tqdm(items, desc=desc, leave=False)


def quant_ranges(qvariables) -> dict:
  """{point name: (x_min, x_max)} of the calibrated collection (numpy), for inspection."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(qvariables[COLLECTION]))
  out = {}
  for path, v in flat.items():
    if path[-1] in ('x_min', 'x_max') and 'fp' not in path[:-1]:
      out.setdefault(path[-2], {})[path[-1]] = np.asarray(v)
  return {k: (d['x_min'], d['x_max']) for k, d in out.items() if len(d) == 2}
