"""Quantization methods, one module each, and the one registry of them.

  lsq                  the LSQ / LSQ+ quantizers of oqt_jax.quant.lsq, under their former name
  migration            moving a per-channel factor out of a LayerNorm (Gamma Migration, SmoothQuant)
  outlier_suppression  Gamma Migration, Token-Wise Clipping (Outlier Suppression, NeurIPS 2022)
  smoothquant          SmoothQuant's activation-to-weight scale migration
  adaround             AdaRound: learned rounding of the weights, layer by layer
  qat                  quantization-aware training: the range state in the train state (train.py)
  llm_int8             LLM.int8() (vector-wise int8 matmuls, outlier dims in FP)

The registry (this module) sits above the method modules: they never import it.

  from oqt_jax.quant import methods
  methods.names()                     # the registered methods, in table order
  qmodel, qvariables, info = methods.run(name, model, variables, batches, qcfg=None)

`batches`: a list of dicts with input_ids / attention_mask (/ token_type_ids). `info`: name,
label, setting, the resolved quant config ('qcfg') and method details (PEG's K, LLM.int8()'s
threshold, 'stored_bytes' where int8 weights are stored).

Which quant config a method runs with (`resolve`):
  qcfg=None          the method's preset: config.quant defaults + PRESET (its original's
                     setting);
  qcfg=partial dict  (a dict or ConfigDict holding only the fields you set): defaults, then
                     the preset, then your fields;
  qcfg=full config.quant + explicit=[fields]: the preset replaces every field not listed in
                     `explicit` (eval.py passes the --config.quant.X flags given);
                     explicit=None counts every field qcfg holds as set.
A preset's 'calib_samples' sets est_num_batches = ceil(samples / batch size) unless
est_num_batches is set; run() uses at most len(batches) batches.

Settings (`setting=`): 'original' = the preset; 'all' = the outlier-free paper's setting
(W8A8, per-tensor, every point quantized: PAPER_W8A8) with the method's own knobs applied.
Rows whose original IS that setting (plain calibration, PEG, W8A{8,16}) and rows without
activation quantizers (FP, LLM.int8(), weight-only) have one setting, named by `single`.

A new method: one module with a registry-shaped function
  fn(model, variables, batches, qcfg, progress=False) -> (qmodel, qvariables[, info dict])
and one `register(...)` line below.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
from typing import Callable, Iterable, Optional, Union

import jax
import numpy as np

from oqt_jax.errors import ConfigError
from oqt_jax.quant import weight_int8
from oqt_jax.quant.calibrate import calibrate
from oqt_jax.quant.methods import adaround, llm_int8, outlier_suppression, smoothquant
from oqt_jax.quant.points import assemble, derive, is_resolved, resolved

SETTINGS = ('original', 'all')
SETTING_CHOICES = ('original', 'all', 'both')
PEG_GROUPS = 6
PERCENTILE = 99.999

# The outlier-free paper's PTQ setting: W8A8, symmetric per-tensor weights, asymmetric
# per-tensor activations (running min-max), every quantization point of the model.
PAPER_W8A8: dict = dict(
    n_bits=8, n_bits_act=8, qmethod='symmetric_uniform', qmethod_acts='asymmetric_uniform',
    per_channel=False, act_granularity='per_tensor', quant_setup='all', quant_dict='',
    symmetric_signed=False, dynamic=False, int8=False, ranges_weights='current_minmax',
    ranges_acts='running_minmax', percentile=-1.0)

Ref = Union[Callable, dict, None]


def _fields_of(ref) -> dict:
  """A preset reference (a function returning a dict, a dict, None) -> dict."""
  return dict((ref() if callable(ref) else ref) or {})


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered method.

  fn: the registry-shaped function. preset: the original's setting (config.quant fields). table_preset: the preset of the comparison's
  'original' row where it differs (a W8A8 table: Outlier Suppression's W8A8 preset).
  all_fields: the method's own knobs kept in the 'all' setting (over PAPER_W8A8; a dict or a
  function returning one). single:
  the one setting of a method that has one ('all' or 'original'), else None. label: text
  with {fields} of the resolved config and of info. calibrates: False when the method
  calibrates nothing. calib_samples: the original's calibration samples.
  """
  name: str
  label: str
  fn: Ref
  preset: Ref = None
  table_preset: Ref = None
  all_fields: Ref = None
  single: Optional[str] = None
  calibrates: bool = True
  calib_samples: Optional[int] = None
  doc: str = ''

  def settings(self, setting: str = 'original') -> tuple[str, ...]:
    if self.single:
      return (self.single,)
    return SETTINGS if setting == 'both' else (setting,)

  def fields(self, setting: str = 'original', table: bool = False) -> dict:
    """The quant fields the method sets in `setting` (the preset's; 'all': PAPER_W8A8 and
    the method's own knobs)."""
    if setting == 'all' and not self.single:
      return dict(PAPER_W8A8, **_fields_of(self.all_fields))
    return _fields_of(self.table_preset if table and self.table_preset else self.preset)


REGISTRY: dict[str, Method] = {}


def register(name: str, label: str, fn: Ref, **kw) -> Method:
  m = Method(name, label, fn, **kw)
  REGISTRY[name] = m
  return m


def names() -> tuple[str, ...]:
  """The registered method names, in the comparison table's order."""
  return tuple(REGISTRY)


def check_name(name, field: str = 'quant.method') -> str:
  """name if registered ('' = plain calibration of the config as it is), else ConfigError in
  one line naming the known methods."""
  if name == '' or name in REGISTRY:
    return name
  raise ConfigError(f'{field}={name!r}: unknown method (known: {", ".join(names())})')


def parse_names(spec, field: str = '--methods') -> tuple[str, ...]:
  """'a,b,c' or a sequence (None / '' / 'all': every method) -> names; ConfigError on an
  unknown one (one line naming the known ones)."""
  if spec is None or (isinstance(spec, str) and spec.strip() in ('', 'all')):
    return names()
  got = [s.strip() for s in (spec.split(',') if isinstance(spec, str) else spec)]
  got = [n for n in got if n]
  unknown = [n for n in got if n not in REGISTRY]
  if unknown or not got:
    raise ConfigError(f'{field}={spec!r}: unknown method {", ".join(unknown) or "(none)"} '
                      f'(known: {", ".join(names())})')
  return tuple(dict.fromkeys(got))


def check_setting(setting: str) -> str:
  if setting not in SETTING_CHOICES:
    raise ConfigError(f'--setting={setting!r}: expected one of {", ".join(SETTING_CHOICES)}')
  return setting


def get(name: str) -> Method:
  check_name(name)
  return REGISTRY[name]


def rows(spec=None, setting: str = 'original') -> list[tuple[str, str]]:
  """(name, setting) of every comparison row: each selected method in `setting` ('both':
  original then all); a method with one setting once."""
  check_setting(setting)
  return [(n, s) for n in parse_names(spec) for s in REGISTRY[n].settings(setting)]


# ---- the quant config of a run ---------------------------------------------------------------
def _as_dict(qcfg) -> dict:
  if qcfg is None:
    return {}
  if 'quant' in qcfg and not isinstance(qcfg['quant'], (str, int, float, bool)):
    qcfg = qcfg['quant']
  return dict(qcfg.to_dict() if hasattr(qcfg, 'to_dict') else qcfg)


def resolve(name: str, qcfg=None, explicit: Optional[Iterable[str]] = None,
            setting: str = 'original', batch_size: Optional[int] = None,
            table: bool = False):
  """The full config.quant `name` runs with (rules in the module docstring), validated once:
  a read-only points.QuantConfig."""
  check_setting(setting)
  given = _as_dict(qcfg)
  explicit = set(given) if explicit is None else set(explicit)
  q = assemble(**given)
  if name == '':
    return resolved(q)
  m = get(name)
  if setting == 'both':
    setting = 'original'
  setting = m.single if m.single in SETTINGS else setting
  for k, v in m.fields(setting, table=table).items():
    if k not in explicit:
      q[k] = v
  samples = m.calib_samples
  if samples and batch_size and 'est_num_batches' not in explicit:
    q.est_num_batches = int(math.ceil(samples / int(batch_size)))
  if 'method' not in explicit:
    q.method = name
  return resolved(q)


def with_preset(qcfg, method: str, explicit: Iterable[str] = (), batch_size: Optional[int] = None,
                setting: str = 'original'):
  """A copy of the full config.quant `qcfg` with the method's preset on every field not in
  `explicit` (the --config.quant.X flags given)."""
  return resolve(method, qcfg, explicit=explicit, setting=setting, batch_size=batch_size)


def _batch_size(batches) -> Optional[int]:
  try:
    b = batches[0]
    x = b['input_ids'] if isinstance(b, dict) else b
    return int(x.shape[0])
  except (IndexError, KeyError, TypeError, AttributeError):
    return None


def label_of(name: str, qcfg, info: Optional[dict] = None) -> str:
  m = get(name)
  q = dict(_as_dict(qcfg), **(info or {}))
  try:
    return m.label.format(**q)
  except (KeyError, IndexError, ValueError):
    return m.label


def run(name: str, model, variables, batches, qcfg=None, *, explicit=None,
        setting: str = 'original', table: bool = False, progress: bool = False):
  """(qmodel, qvariables, info) of the method `name` on (model, variables), calibrated on
  `batches` (a list of dicts with input_ids / attention_mask), quant config per `resolve`; a
  config `resolve` / `with_preset` already returned (explicit=None) is used as it is."""
  check_name(name)
  batches = list(batches) if batches is not None else []
  if is_resolved(qcfg) and explicit is None:
    q = qcfg
  else:
    q = resolve(name, qcfg, explicit=explicit, setting=setting, batch_size=_batch_size(batches),
                table=table)
  if batches and int(q.est_num_batches) > len(batches):
    q = derive(q, est_num_batches=len(batches))
  fn = _plain if name == '' else REGISTRY[name].fn
  try:
    takes_progress = 'progress' in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    takes_progress = False
  out = fn(model, variables, batches, q, **({'progress': progress} if takes_progress else {}))
  qmodel, qvars = out[0], out[1]
  extra = dict(out[2]) if len(out) > 2 and isinstance(out[2], dict) else {}
  m = REGISTRY.get(name)
  used = (m.single if m and m.single else setting) if name else 'config'
  info = dict(extra, name=name, setting=used, qcfg=q,
              label=label_of(name, q, extra) if name else 'calibration')
  leaves = jax.tree_util.tree_leaves(dict(qvars).get('params', {}))
  if any(np.dtype(x.dtype) == np.int8 for x in leaves):   # int8 weights stored: real bytes
    info['stored_bytes'] = weight_int8.param_bytes(qvars)
  return qmodel, qvars, info


# ---- the rows this module implements (the plain calibration and its variants) ---------------
def _plain(model, variables, batches, qcfg, progress=False):
  return calibrate(model, variables, batches, qcfg, progress=progress,
                   num_batches=min(len(batches), int(qcfg.est_num_batches)) or None)


def _fp(model, variables, batches, qcfg, progress=False):
  return model, variables


def merged_quant_dict(qcfg, extra: dict) -> str:
  """The config's quant_dict with `extra` entries added (extra wins)."""
  base = qcfg.get('quant_dict', '') or ''
  d = ast.literal_eval(base) if isinstance(base, str) and base.strip() else dict(base or {})
  d.update(extra)
  return repr(d)


def peg_groups(hidden: int, k: int = PEG_GROUPS) -> int:
  """PEG's K: 6, or the largest divisor of the hidden size <= 6 (tiny models)."""
  return max(g for g in range(1, k + 1) if hidden % g == 0)


def _with_quant_dict(qcfg, extra: dict):
  return derive(qcfg, quant_dict=merged_quant_dict(qcfg, extra))


def _peg(model, variables, batches, qcfg, progress=False):
  """W8A8 with per-embedding-group ranges (K groups, permuted by range) on the FFN input,
  FFN output and residual sum (x, h, y)."""
  k = peg_groups(model.cfg.hidden_size)
  g = f'ngp{k}'
  qm, qv = _plain(model, variables, batches, _with_quant_dict(qcfg, {'x': g, 'h': g, 'y': g}),
                  progress)
  return qm, qv, {'peg_groups': k}


def _w8a16(model, variables, batches, qcfg, progress=False):
  """x, h and y (FFN input, FFN output, residual sum) at 16 bits."""
  return _plain(model, variables, batches, _with_quant_dict(qcfg, {'x': 16, 'h': 16, 'y': 16}),
                progress)


def _llm_int8(model, variables, batches, qcfg, progress=False):
  qm, qv = llm_int8.llm_int8_method(model, variables, batches, qcfg)[:2]
  return qm, qv, {'threshold': float(qcfg.llm_int8_threshold)}


def _weight_only(model, variables, batches, qcfg, progress=False):
  return weight_int8.weight_only(model, variables)


def _os_all_fields() -> dict:
  p = outlier_suppression.PRESET
  return {k: p[k] for k in ('twc_fine', 'twc_lr', 'twc_epochs') if k in p}


def _adaround_all_fields() -> dict:
  p = adaround.PRESET
  return dict({k: v for k, v in p.items() if k.startswith('adaround_')}, n_bits=4)


# ---- the registry: one line per method (the comparison table's rows, in order) ---------------
register('fp', 'FP32', _fp, single='original', calibrates=False,
         doc='the floating-point model')
register('w8a8_minmax', 'W8A8 per-tensor, min-max', _plain, preset=PAPER_W8A8, single='all',
         doc='plain calibration, running min-max activation ranges')
register('w8a8_percentile', f'W8A8 per-tensor, percentile {PERCENTILE}', _plain,
         preset=dict(PAPER_W8A8, ranges_acts='percentile', percentile=PERCENTILE), single='all',
         doc='plain calibration, percentile activation ranges')
register('w8a8_mse', 'W8A8 per-tensor, MSE', _plain,
         preset=dict(PAPER_W8A8, ranges_acts='mse'), single='all',
         doc='plain calibration, MSE activation ranges')
register('peg', 'W8A8 PEG (K={peg_groups}, permuted)', _peg, preset=PAPER_W8A8, single='all',
         doc='per-embedding-group activation ranges on x, h, y')
register('w8a16', 'W8A{{8,16}} (x, h, y at 16 bits)', _w8a16, preset=PAPER_W8A8, single='all',
         doc='mixed precision: x, h, y at 16 bits')
register('adaround', 'AdaRound W{n_bits}A{n_bits_act}', adaround.adaround,
         preset=adaround.PRESET, all_fields=_adaround_all_fields, calib_samples=1024,
         doc='learned rounding of the weights (original: W4A32, per-tensor MSE-grid ranges)')
register('outlier_suppression', 'Outlier Suppression W{n_bits}A{n_bits_act} (Gamma + TWC)',
         outlier_suppression.outlier_suppression_method,
         preset=outlier_suppression.PRESET, table_preset=outlier_suppression.PRESET_W8A8,
         all_fields=_os_all_fields, calib_samples=256,
         doc='Gamma Migration, then Token-Wise Clipping (original: W6A6; W8A8 in the table)')
register('smoothquant', 'SmoothQuant (alpha {smoothquant_alpha:g}) W8A8 {act_granularity}',
         smoothquant.smoothquant_method, preset=smoothquant.PRESET,
         all_fields={'smoothquant_alpha': 0.5}, calib_samples=512,
         doc='activation-to-weight scale migration, then W8A8 (original: per-token dynamic)')
register('llm_int8', 'LLM.int8() (threshold {threshold:g})', _llm_int8,
         preset=llm_int8.PRESET, single='original', calibrates=False,
         doc='vector-wise int8 matmuls, outlier dims in FP')
register('weight_only', 'weight-only int8 (absmax per channel)', _weight_only, single='original',
         calibrates=False, doc='int8 weights, FP activations')
