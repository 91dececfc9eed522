"""The method table: one named pipeline per row of the comparison (`eval.py --compare`).

  qmodel, qvariables, info = run_method('smoothquant', model, variables, batches, qcfg)

Every row starts from the same floating-point (model, variables), the same calibration
`batches` (a list) and the same base quant config `qcfg` (config.quant: W8A8 per tensor by
default, the user's overrides included); a row changes only what defines its method:

  fp               the floating-point model
  w8a8_minmax      W8A8 per tensor, running min-max activation ranges (quant.calibrate)
  w8a8_percentile  W8A8 per tensor, 99.999 percentile activation ranges
  w8a8_mse         W8A8 per tensor, MSE activation ranges
  peg              W8A8 with per-embedding-group activations (K=6, permuted by range) on the
                   FFN input, FFN output and residual sum (x, h, y); K = the largest divisor
                   of the hidden size <= 6 when 6 does not divide it (tiny models)
  w8a16            W8A{8,16}: x, h and y at 16 bits
  gamma_twc        Gamma Migration, then Token-Wise Clipping (Outlier Suppression)
  smoothquant      SmoothQuant (alpha quant.smoothquant_alpha, default 0.5), then W8A8
  llm_int8         LLM.int8() on every Dense layer (threshold quant.llm_int8_threshold)
  weight_only      int8 weights (absmax per output channel), FP activations
  adaround_w4a8    AdaRound 4-bit weights, 8-bit activations (ADAROUND_ITERS iterations)

`info` has 'weight_bits' (a function of a weight site, for the nominal model size), 'label'
and method details (PEG's K, LLM.int8()'s threshold). Methods of other modules are looked up
by name on `oqt_jax.quant` when the row runs, so a missing one fails that row only.
"""
from __future__ import annotations

import ast
from typing import Any, Callable

import ml_collections

from oqt_jax.errors import ConfigError

ADAROUND_ITERS = 200     # AdaRound iterations per layer for the table (the original: 1000-10000)
PEG_GROUPS = 6
PERCENTILE = 99.999
SMOOTHQUANT_ALPHA = 0.5

LABELS = {
    'fp': 'FP32',
    'w8a8_minmax': 'W8A8 per-tensor, min-max',
    'w8a8_percentile': f'W8A8 per-tensor, percentile {PERCENTILE}',
    'w8a8_mse': 'W8A8 per-tensor, MSE',
    'peg': 'W8A8 PEG (K={k}, permuted)',
    'w8a16': 'W8A{8,16} (x, h, y at 16 bits)',
    'gamma_twc': 'Gamma Migration + Token-Wise Clipping',
    'smoothquant': f'SmoothQuant (alpha {SMOOTHQUANT_ALPHA}) W8A8',
    'llm_int8': 'LLM.int8() (threshold {t:g})',
    'weight_only': 'weight-only int8 (absmax per channel)',
    'adaround_w4a8': 'AdaRound W4A8',
}
METHOD_NAMES = tuple(LABELS)


def parse_methods(spec) -> tuple[str, ...]:
  """'a,b,c' (or a sequence; None / '' / 'all': every row) -> names; ConfigError on unknown."""
  if spec is None or (isinstance(spec, str) and spec.strip() in ('', 'all')):
    return METHOD_NAMES
  names = [s.strip() for s in (spec.split(',') if isinstance(spec, str) else spec)]
  names = [n for n in names if n]
  unknown = [n for n in names if n not in LABELS]
  if unknown or not names:
    raise ConfigError(f'--methods={spec!r}: unknown method {", ".join(unknown) or "(none)"} '
                      f'(known: {", ".join(METHOD_NAMES)})')
  return tuple(dict.fromkeys(names))


# ---- quant configs of the rows ----------------------------------------------------------------
def derived(qcfg, **fields) -> ml_collections.ConfigDict:
  """A copy of qcfg with `fields` set (fields the config does not have are added)."""
  q = ml_collections.ConfigDict(qcfg.to_dict() if hasattr(qcfg, 'to_dict') else dict(qcfg))
  with q.unlocked():
    for k, v in fields.items():
      q[k] = v
  return q


def merged_quant_dict(qcfg, extra: dict) -> str:
  """The config's quant_dict with `extra` entries added (extra wins)."""
  base = qcfg.get('quant_dict', '') or ''
  d = ast.literal_eval(base) if isinstance(base, str) and base.strip() else dict(base or {})
  d.update(extra)
  return repr(d)


def _no_percentile(qcfg) -> dict:
  """percentile=-1 (plain min / max; a percentile > 0 would turn running_minmax into an EMA of
  percentiles) unless the weights' estimator is the percentile one."""
  return {} if qcfg.get('ranges_weights') == 'percentile' else {'percentile': -1.0}


def peg_groups(hidden: int, k: int = PEG_GROUPS) -> int:
  return max(g for g in range(1, k + 1) if hidden % g == 0)


def _quant_fn(name: str) -> Callable:
  """quant.<name>, called without a progress bar when it takes `progress`."""
  import inspect
  from oqt_jax import quant
  fn = getattr(quant, name)
  try:
    quiet = 'progress' in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    quiet = False
  return (lambda *a, **kw: fn(*a, progress=False, **kw)) if quiet else fn


def _rules_bits(rules) -> Callable:
  """weight site -> bits under `rules` (None: stored as is, e.g. an FP head)."""
  def bits(site):
    specs = [rules.spec(p) for p in site.points]
    if not specs or not all(s.enabled for s in specs):
      return None
    return max(s.n_bits for s in specs)
  return bits


def _calibrated(model, variables, batches, q, label, **info):
  from oqt_jax import quant
  qmodel, qvars = quant.calibrate(model, variables, batches, q, num_batches=len(batches))
  return qmodel, qvars, dict(label=label, qcfg=q, **info)


def run_method(name: str, model, variables, batches: list, qcfg) -> tuple[Any, Any, dict]:
  """(qmodel, qvariables, info) of the row `name` (see the module docstring)."""
  from oqt_jax import quant
  from oqt_jax.quant.methods import llm_int8 as int8_method
  from oqt_jax.quant import weight_int8
  if 'quant' in qcfg:
    qcfg = qcfg.quant
  label = LABELS[name]
  if name == 'fp':
    return model, variables, dict(label=label)
  if name == 'w8a8_minmax':
    return _calibrated(model, variables, batches,
                       derived(qcfg, ranges_acts='running_minmax', **_no_percentile(qcfg)), label)
  if name == 'w8a8_percentile':
    return _calibrated(model, variables, batches,
                       derived(qcfg, ranges_acts='percentile', percentile=PERCENTILE), label)
  if name == 'w8a8_mse':
    return _calibrated(model, variables, batches,
                       derived(qcfg, ranges_acts='mse', **_no_percentile(qcfg)), label)
  if name == 'peg':
    k = peg_groups(model.cfg.hidden_size)
    g = f'ngp{k}'
    q = derived(qcfg, quant_dict=merged_quant_dict(qcfg, {'x': g, 'h': g, 'y': g}))
    return _calibrated(model, variables, batches, q, label.format(k=k), peg_groups=k)
  if name == 'w8a16':
    q = derived(qcfg, quant_dict=merged_quant_dict(qcfg, {'x': 16, 'h': 16, 'y': 16}))
    return _calibrated(model, variables, batches, q, label)
  if name == 'gamma_twc':
    m2, v2 = _quant_fn('gamma_migration')(model, variables)
    qmodel, qvars = _quant_fn('token_wise_clipping')(m2, v2, batches, qcfg)
    return qmodel, qvars, dict(label=label, qcfg=qcfg)
  if name == 'smoothquant':
    alpha = float(qcfg.get('smoothquant_alpha', SMOOTHQUANT_ALPHA))
    m2, v2 = _quant_fn('smoothquant')(model, variables, batches, alpha=alpha)
    return _calibrated(m2, v2, batches, qcfg, label.replace(str(SMOOTHQUANT_ALPHA), f'{alpha:g}'))
  if name == 'llm_int8':
    t = float(qcfg.get('llm_int8_threshold', int8_method.DEFAULT_THRESHOLD))
    qmodel, qvars = int8_method.llm_int8(model, variables, t)
    return qmodel, qvars, dict(label=label.format(t=t), threshold=t,
                               weight_bits=lambda s: 8 if s.kind == 'dense' else None)
  if name == 'weight_only':
    qmodel, qvars = weight_int8.weight_only(model, variables)
    return qmodel, qvars, dict(label=label, stored_bytes=weight_int8.param_bytes(qvars))
  if name == 'adaround_w4a8':
    fields = dict(n_bits=4, n_bits_act=8)
    if 'adaround_iters' in qcfg:
      fields['adaround_iters'] = min(int(qcfg.adaround_iters), ADAROUND_ITERS)
    q = derived(qcfg, **fields)
    qmodel, qvars = _quant_fn('adaround')(model, variables, batches, q)
    return qmodel, qvars, dict(label=label, qcfg=q)
  raise ConfigError(f'unknown method {name!r} (known: {", ".join(METHOD_NAMES)})')


def model_bytes(name: str, model, variables, qmodel, qvariables, info: dict, qcfg) -> int:
  """The row's model size in bytes: stored int8 weights for weight_only; otherwise the
  parameters with the method's quantized weights counted at their bit width (+ float32
  scales), the rest as stored (FP: every parameter as stored)."""
  from oqt_jax.quant import weight_int8
  if 'stored_bytes' in info:
    return int(info['stored_bytes'])
  if name == 'fp':
    return weight_int8.param_bytes(variables, ('params',))
  bits = info.get('weight_bits')
  per_channel = True
  if bits is None:
    rules = getattr(getattr(qmodel, 'quant', None), 'rules', None)
    q = info.get('qcfg', qcfg)
    if 'quant' in q:
      q = q.quant
    if rules is None:
      from oqt_jax.quant.points import Rules
      rules = Rules.build(q, model.cfg)
    bits = _rules_bits(rules)
    per_channel = bool(q.get('per_channel', False))
  base = {'params': qvariables['params']} if 'params' in qvariables else variables
  return weight_int8.model_bytes(qmodel, base, bits, per_channel=per_channel)
