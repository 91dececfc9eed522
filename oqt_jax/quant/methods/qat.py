"""Quantization-aware training: train.py with config.quant.qat=True trains the quantized model.

  1. ranges: calibration (quant.calibrate) on est_num_batches batches of the train split,
     with the run's parameters at the start of QAT (a fresh or `init_from` model, or the newest
     floating-point checkpoint of the workdir: rerunning an FP run with qat=True and more
     steps continues it as QAT);
  2. the range state (the 'quant' collection) joins the train state: checkpointed by Orbax,
     restored on resume, replicated over the mesh;
  3. every step trains the weights through the STE; config.quant.learn_ranges picks what
     happens to the ranges:
       'none'    (default; the original's default, its `estimate_ranges_train` state) not
                 learned: every training step runs each quantizer's range estimator on that
                 step's tensors (activations: the calibrated estimator state continues, e.g.
                 the running_minmax EMA; weights: the weight estimator on the current
                 weights) and quantizes with the new range; evaluation uses the last ranges;
       'fixed'   frozen at the calibrated values (the original's --fix-act-ranges
                 --fix-weight-ranges);
       'minmax'  learned (the original's --learn-ranges): every quantizer's (delta,
                 zero_float) — asymmetric — or delta — symmetric — trained with the weights
                 (`minmax_quantize`: scale = max(delta, eps), zero point =
                 clamp(round_ste(zero_float), 0, 2^b - 1));
       'lsq'     the scale of every quantizer, LSQ gradient scale 1/sqrt(numel * q_max)
                 (zero-points, for asymmetric quantizers, stay at their calibrated value);
       'lsq+'    scale and, for asymmetric quantizers, a float zero-point (rounded with the
                 STE, clamped to the grid); symmetric quantizers learn the scale only;
     learned ranges use Adam on the parameters' learning-rate schedule (no weight decay);
  4. the export writes the range state beside the HF checkpoint (hf/quant_state.msgpack,
     hf/quant_config.json): eval.py --quantize on the workdir evaluates exactly that quantized
     model, without recalibrating.
The hooks run in mode 'learned' (quant/hooks.py); the train step differentiates the learnable
leaves of the 'quant' collection (`split` / `merge`), and with 'none' takes the collection the
estimators wrote (`estimates_ranges`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from oqt_jax.errors import ConfigError
from oqt_jax.quant import quantizers
from oqt_jax.quant.calibrate import _step_fn, calibrate, model_inputs
from oqt_jax.quant.hooks import COLLECTION, QuantHooks
from oqt_jax.quant.points import assemble, resolved
from oqt_jax.quant.quantizers import minmax_quantize  # noqa: F401  (qat.minmax_quantize)

LEARNABLE = {'none': (), 'fixed': (), 'minmax': ('delta', 'zero_float'), 'lsq': ('scale',),
             'lsq+': ('scale', 'zero_point')}
RANGE_KEYS = ('x_min', 'x_max', 'delta', 'zero_float', 'scale', 'zero_point')
STATE_FILE = 'quant_state.msgpack'
CONFIG_FILE = 'quant_config.json'


def enabled(config) -> bool:
  return 'quant' in config and bool(config.quant.get('qat', False))


def learn_ranges(config) -> str:
  q = config.quant if 'quant' in config else config
  return str(q.get('learn_ranges', 'none'))


def estimates_ranges(learn: str) -> bool:
  """True where the training step re-estimates the ranges ('none'): the 'quant' collection is
  mutable in the step and the estimators' new state replaces it."""
  return learn == 'none'


def check(config, model_cfg) -> None:
  """ConfigError for QAT settings that cannot be trained."""
  q = config.quant
  if q.get('int8', False):
    raise ConfigError('quant.int8=True: QAT trains fake-quantized models; evaluate int8 after')
  if q.get('dynamic', False):
    raise ConfigError('quant.dynamic=True: QAT needs calibrated (static) ranges')
  if learn_ranges(config) in ('lsq', 'lsq+'):
    rules = QuantHooks.build(q, model_cfg).rules
    for n in rules.act_points():
      if rules.spec(n).enabled and rules.spec(n).granularity == 'groups':
        raise ConfigError(f'quant.learn_ranges={learn_ranges(config)!r}: point {n!r} uses '
                          "per-embedding groups; learn them with 'minmax'")


def train_hooks(config, model_cfg) -> QuantHooks:
  """The hooks of the model being trained (mode 'learned')."""
  return QuantHooks.build(config.quant, model_cfg, mode='learned',
                          learn_ranges=learn_ranges(config))


def quantized_model(model, config):
  return model.clone(quant=train_hooks(config, model.cfg))


# ---- the learnable part of the 'quant' collection --------------------------------------------
def _is_point_state(path) -> bool:
  return len(path) >= 2 and 'fp' not in path[:-1] and not str(path[-2]).startswith('in_')


def split(quant, learn: str) -> dict:
  """The learnable leaves of `quant` as a nested dict (empty for 'none')."""
  keys = LEARNABLE[learn]
  flat = traverse_util.flatten_dict(flax.core.unfreeze(quant))
  return traverse_util.unflatten_dict(
      {p: v for p, v in flat.items() if p[-1] in keys and _is_point_state(p)})


def merge(quant, learned) -> dict:
  """`quant` with the learnable leaves replaced by `learned`."""
  if not learned:
    return quant
  flat = dict(traverse_util.flatten_dict(flax.core.unfreeze(quant)))
  flat.update(traverse_util.flatten_dict(flax.core.unfreeze(learned)))
  return traverse_util.unflatten_dict(flat)


def to_learned(quant, rules, learn: str) -> dict:
  """Calibrated ranges -> the parameterisation learned by `learn`, so that the first QAT step
  starts from the calibrated quantizers:
    'minmax'        every point's {'x_min', 'x_max'} becomes the original's quantizer state
                    after set_quant_range: asymmetric {'delta' = (x_max - x_min) / (2^b - 1),
                    'zero_float' = -x_min / delta}, symmetric {'delta' = max(|x_min|, x_max) /
                    q_max} (signed grid iff x_min < 0 anywhere, or quant.symmetric_signed),
                    after the widening to contain 0; plus the constant grid 'q_min', 'q_max';
    'lsq' / 'lsq+'  {'scale', 'zero_point' (asymmetric only), 'q_min', 'q_max'} of the same
                    quantizer;
    'none' / 'fixed' unchanged.
  'n' and a permuted PEG point's 'group_ids' are kept."""
  if learn not in ('minmax', 'lsq', 'lsq+'):
    return quant
  flat = traverse_util.flatten_dict(flax.core.unfreeze(quant))
  groups: dict = {}
  for p, v in flat.items():
    groups.setdefault(p[:-1], {})[p[-1]] = v
  out = {}
  for prefix, st in groups.items():
    name = prefix[-1] if prefix else ''
    if 'x_min' in st and 'x_max' in st and _is_point_state(prefix + ('x',)):
      spec = rules.spec(name)
      keep = {k: v for k, v in st.items() if k not in ('x_min', 'x_max')}
      if learn == 'minmax':
        st = dict(keep, **minmax_init(st['x_min'], st['x_max'], spec.n_bits, spec.symmetric,
                                      x_neg=spec.x_neg))
      elif 'group_ids' not in st:
        s, z, q_min, q_max = quantizers.scale_zero_point(st['x_min'], st['x_max'], spec.n_bits,
                                                         spec.symmetric, x_neg=spec.x_neg)
        st = dict(keep, scale=s, q_min=jnp.asarray(q_min, jnp.float32),
                  q_max=jnp.asarray(q_max, jnp.float32))
        if not spec.symmetric:
          st['zero_point'] = jnp.broadcast_to(z, jnp.shape(s)).astype(jnp.float32)
    for k, v in st.items():
      out[prefix + (k,)] = v
  return traverse_util.unflatten_dict(out)


# ---- the original's uniform quantizer with learnable (delta, zero_float) ---------------------
def minmax_init(x_min, x_max, n_bits: int, symmetric: bool, x_neg=None) -> dict:
  """The quantizer state that reproduces the range [x_min, x_max]: the original's
  set_quant_range (range widened to contain 0, x_max >= eps; delta not clamped here, the
  forward pass clamps it). Asymmetric: {'delta', 'zero_float', 'q_min', 'q_max'}; symmetric:
  {'delta', 'q_min', 'q_max'} (the grid fixed here, as the original's `signed` buffer)."""
  eps = jnp.float32(quantizers.EPS)
  x_min = jnp.asarray(x_min, jnp.float32)
  x_max = jnp.asarray(x_max, jnp.float32)
  x_min = jnp.where(x_min < 0, x_min, jnp.float32(0))
  x_max = jnp.where(x_max > eps, x_max, eps)
  if symmetric:
    signed = jnp.any(x_min < 0) if x_neg is None else jnp.asarray(x_neg, bool)
    s_min, s_max = quantizers.int_grid(n_bits, True, signed=True)
    u_min, u_max = quantizers.int_grid(n_bits, True, signed=False)
    q_min = jnp.where(signed, jnp.float32(s_min), jnp.float32(u_min))
    q_max = jnp.where(signed, jnp.float32(s_max), jnp.float32(u_max))
    return {'delta': jnp.maximum(-x_min, x_max) / q_max, 'q_min': q_min, 'q_max': q_max}
  q_min, q_max = quantizers.int_grid(n_bits, False)
  delta = (x_max - x_min) / jnp.float32(q_max)
  return {'delta': delta, 'zero_float': -x_min / delta,
          'q_min': jnp.float32(q_min), 'q_max': jnp.float32(q_max)}


def range_optimizer(schedule) -> optax.GradientTransformation:
  """Adam on the ranges, on the parameters' learning-rate schedule (no weight decay)."""
  return optax.adam(schedule)


# ---- setting up the train state --------------------------------------------------------------
def calibrate_ranges(model, params, batches: Iterable[Any], config, *, progress=False):
  """The QAT starting point: calibrated ranges in the learned parameterisation."""
  qmodel, qvars = calibrate(model, {'params': params}, batches, config.quant,
                            progress=progress)
  return to_learned(jax.device_get(qvars[COLLECTION]), qmodel.quant.rules,
                    learn_ranges(config))


def abstract_quant(model, config, params_shapes, batch) -> Any:
  """ShapeDtypeStructs of the QAT 'quant' collection (the restore target)."""
  hooks = QuantHooks.build(config.quant, model.cfg)
  init = _step_fn(model.clone(quant=None), hooks, 'init')
  inputs = model_inputs(model, {k: v for k, v in batch.items()})
  shapes = jax.eval_shape(lambda p, i: init({'params': p}, None, i), params_shapes, inputs)
  return jax.eval_shape(lambda q: to_learned(q, hooks.rules, learn_ranges(config)), shapes)


def with_quant(state, quant, range_tx, learn: str, sharding=None):
  """state with the range state (placed with `sharding`) and its optimizer state."""
  if sharding is not None:
    quant = jax.device_put(quant, sharding)
  opt = range_tx.init(split(quant, learn))
  if sharding is not None:
    opt = jax.device_put(opt, sharding)
  return state.replace(quant=quant, quant_opt_state=opt, range_tx=range_tx, learn_ranges=learn)


# ---- export / import beside the HF checkpoint --------------------------------------------------
def export(quant, out_dir: str, config) -> str:
  """Writes the learned 'quant' collection and the quant config into `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  host = jax.tree.map(np.asarray, jax.device_get(flax.core.unfreeze(quant)))
  with open(os.path.join(out_dir, STATE_FILE), 'wb') as fh:
    fh.write(flax.serialization.msgpack_serialize(host))
  q = config.quant.to_dict()
  with open(os.path.join(out_dir, CONFIG_FILE), 'w') as fh:
    json.dump(q, fh, indent=1, sort_keys=True, default=str)
  return out_dir


def load_exported(model_dir: Optional[str]):
  """(quant ConfigDict, 'quant' collection) of a QAT export, or None if `model_dir` has none."""
  if not model_dir or not os.path.exists(os.path.join(model_dir, STATE_FILE)):
    return None
  with open(os.path.join(model_dir, CONFIG_FILE)) as fh:
    d = json.load(fh)
  if isinstance(d.get('adaround_beta'), list):
    d['adaround_beta'] = tuple(d['adaround_beta'])
  qcfg = resolved(assemble(**d))
  with open(os.path.join(model_dir, STATE_FILE), 'rb') as fh:
    state = flax.serialization.msgpack_restore(fh.read())
  return qcfg, jax.tree.map(jnp.asarray, state)


def quantized_from_export(model, variables, model_dir):
  """(qmodel, qvariables) of a QAT export (mode 'frozen'), or None."""
  got = load_exported(model_dir)
  if got is None:
    return None
  qcfg, state = got
  qmodel = model.clone(quant=QuantHooks.build(qcfg, model.cfg, mode='frozen'))
  qvars = dict(variables, **{COLLECTION: state})
  return qmodel, qvars, qcfg


def range_values(quant) -> dict:
  """{path: array} of the range leaves (x_min / x_max, delta / zero_float, scale / zero_point),
  for inspection."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(quant))
  return {'/'.join(map(str, p)): np.asarray(v) for p, v in flat.items()
          if p[-1] in RANGE_KEYS and _is_point_state(p)}
