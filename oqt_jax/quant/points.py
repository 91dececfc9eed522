"""Quantization points and the rules that decide, per point, how (or whether) it is quantized.

Point names (the models call the hooks with these; a layer index follows layer points):

  BERT  ewt (word + token-type embedding sum) · e (embedding sum, + positions) · eln
        (embedding LN) · per layer i: q,k,v (Q/K/V outputs), s (scores, after 1/sqrt(d), before
        the mask), p (probabilities), c (context, after the gate), g (attention output projection),
        u (attention residual sum), x (attention LN out = FFN input), f (FFN intermediate,
        after GELU), h (FFN output), y (FFN residual sum), z (FFN LN out) · heads: P (pooler),
        C (classifier logits), Mt / Mln / M (MLM transform, its LN, logits)
  OPT   e (embedding sum) · pin / pout (project_in / project_out) · per layer i: a
        (self_attn_layer_norm out), q,k,v,s,p, c (context, BEFORE the gate, as the original
        OPT code), g, u (attention residual sum), x
        (final_layer_norm out = FFN input), f (fc1 after ReLU), h (fc2), y (FFN residual sum =
        layer output) · fln (final decoder LN) · M (logits)
  weights  'w' + the output point of a Dense or LayerNorm (wq3, wf3, wx3, weln, wC, wP, ...),
        embedding tables Et (words), Ep (positions), Ets (token types), wM (tied LM decoder)

Resolution of one point, in order (later steps win, attribute by attribute):
  1. config defaults: weights n_bits symmetric (qmethod), per-tensor or per-channel, estimator
     ranges_weights; activations n_bits_act asymmetric (qmethod_acts), granularity
     act_granularity, estimator ranges_acts;
  2. quant_setup: all | fp32_head | fp32_head+int16_final_LN | fp32_head+int16_all_LN |
     FP_logits | MSE_logits | CE_logits | linear_inputs | matmul_inputs;
  3. quant_dict overrides, least specific first: 'L' < 'x' (a point letter, all layers) < 'L3'
     < 'x3'. A value is the bits (int; 32 = fp32), 'fp32', 'per_tensor', 'per_embd',
     'per_token', 'ngK' (K groups) or 'ngpK' (K groups, range-sorted permutation). 'L' keys set bits or
     fp32 of weights and activations of the layer, granularities only of its activations.
     An 'e' key also sets 'ewt' (the original's 'e' drives both embedding-sum quantizers).
     Any 'Et' key (BERT) also switches the word-embedding table's range estimator to MSE with
     golden-section search, as the originals do; MSE_logits uses golden-section search too.

quant_setup, as the originals: fp32_head* leave every head point (weights and outputs) in FP;
int16_final_LN / int16_all_LN put the LayerNorm's output AND its gamma at 16 bits (the
original sets both quantizers of the LN); FP_logits leaves only the logits' output in FP.

Setups that select WHICH points are quantized (every other point, weights included, is FP;
quant_dict overrides still apply on top, e.g. {'q': 8, 'k': 8, 'v': 8}):

  linear_inputs  SmoothQuant's W8A8 (W8A8Linear on every Linear of the decoder layers): the
        weight of every Dense layer inside the layers (wq, wk, wv, wg, wf, wh) and the
        activation feeding it; embeddings, LayerNorm gammas, the heads and OPT's
        project_in / project_out stay FP (the original leaves lm_head in FP).
          BERT          eln, z0..z(L-2) (Q/K/V inputs), c_i (out-proj input), x_i (FFN1
                        input), f_i (FFN2 input, after GELU)
          OPT pre-LN    a_i (Q/K/V input), c_i, x_i (fc1 input), f_i (fc2 input, after ReLU)
          OPT post-LN   e, x0..x(L-2) (Q/K/V inputs), a_i (fc1 input), c_i, f_i
  matmul_inputs  Outlier Suppression's setting (the inputs of every matmul): LayerNorm outputs
        feeding Q/K/V and the FFN, Q, K, V, the probabilities, the context, the FFN
        activation's output, and the inputs of the head's Linears; every Linear weight and the
        embedding tables (the original's QEmbedding); residual sums, Linear outputs that feed
        no matmul, the scores, the logits and LayerNorm gammas stay FP.
          BERT          eln; per layer q, k, v, p, c, x, f, z (z(L-1) feeds the pooler / MLM
                        transform); P (classifier input), Mln (MLM decoder input); weights
                        Et, Ep, Ets, wq, wk, wv, wg, wf, wh, wP, wC, wMt, wM
          OPT pre-LN    per layer a, q, k, v, p, c, x, f; fln (LM head / project_out input),
                        pout; weights Et, Ep, wq, wk, wv, wg, wf, wh, wpin, wpout, wM
          OPT post-LN   e; per layer q, k, v, p, c, a, f, x (x(L-1) feeds the LM head); pout;
                        the same weights
  The points are outputs: where a post-LN model's Linear input also feeds the residual
  branch (BERT eln / z, post-LN OPT e / x / a), its quantizer acts on the residual too (the
  originals quantize only the Linear's copy in SmoothQuant, both in Outlier Suppression).
  BERT's pooler reads token 0 of z(L-1): Outlier Suppression quantizes that token alone (its
  range from token 0 only); here z(L-1) is one quantizer over every token.

Activation granularity 'per_token' (quant.act_granularity or a quant_dict value): one range
per row of the last (hidden) axis, from the current tensor in every mode that quantizes
(nothing is stored or calibrated): absmax with symmetric activations, min / max with
asymmetric ones. (B, T, D) tensors: one range per token over D (Q / K / V and the context
over all heads together); the 4-D scores / probabilities (B, H, T, T): one range per
(batch, head, query) row over the keys, the keys of padding tokens excluded (a row of a
padding query keeps all its entries).

quant.symmetric_signed=True: every symmetric quantizer uses the signed grid
[-2^(b-1), 2^(b-1) - 1], s = absmax / (2^(b-1) - 1), also on non-negative tensors (ReLU
outputs, probabilities): SmoothQuant's fake quant. False (default): the unsigned grid
[0, 2^b - 1] where the quantizer's x_min >= 0, as transformer-quantization.

Deliberate differences from the originals:
  - precedence: the more specific key wins (the original applied 'x3', 'x', 'L3', 'L' in that
    order, so the generic key overwrote the specific one);
  - 'L' keys also set the layer's weights (the original's touched only activation quantizers);
  - 'wP' sets the pooler's weight (the original's 'wP' hijacked the pooler's activation);
  - the BERT MLM head (Mt, Mln, M, wM...) follows quant_setup; the 2023 original kept the
    whole MLM head in FP whatever quant_setup: use fp32_head to reproduce its BERT numbers;
  - int16_final_LN on a post-LN model (no final decoder LN) uses the last layer's final LN
    (the original had no final LN to set there).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import re
from typing import Mapping, Optional

import ml_collections

from oqt_jax.errors import ConfigError

# ---- the points ----------------------------------------------------------------------------
LAYER_ACTS = {
    'bert': ('q', 'k', 'v', 's', 'p', 'c', 'g', 'u', 'x', 'f', 'h', 'y', 'z'),
    'opt': ('a', 'q', 'k', 'v', 's', 'p', 'c', 'g', 'u', 'x', 'f', 'h', 'y'),
}
GLOBAL_ACTS = {
    'bert': ('ewt', 'e', 'eln', 'P', 'C', 'Mt', 'Mln', 'M'),
    'opt': ('e', 'pin', 'fln', 'pout', 'M'),
}
TABLES = {'bert': ('Et', 'Ep', 'Ets'), 'opt': ('Et', 'Ep')}
# Activation points whose producer has a weight (Dense kernel or LayerNorm gamma): 'w' + point.
WEIGHTED = ('q', 'k', 'v', 'g', 'f', 'h', 'x', 'z', 'a', 'eln', 'fln', 'pin', 'pout', 'P', 'C',
            'Mt', 'Mln', 'M')
HEAD = ('P', 'C', 'Mt', 'Mln', 'M')
LOGITS = ('C', 'M')
LN_ACTS = ('eln', 'x', 'z', 'a', 'fln', 'Mln')
ALL_LAYER_ACTS = tuple(sorted(set(LAYER_ACTS['bert']) | set(LAYER_ACTS['opt'])))
ALL_GLOBAL_ACTS = tuple(sorted(set(GLOBAL_ACTS['bert']) | set(GLOBAL_ACTS['opt'])))
ALL_TABLES = ('Et', 'Ep', 'Ets')

QUANT_SETUPS = ('all', 'fp32_head', 'fp32_head+int16_final_LN', 'fp32_head+int16_all_LN',
                'FP_logits', 'MSE_logits', 'CE_logits', 'linear_inputs', 'matmul_inputs')
# Setups that name the quantized points (Rules.selected); every other point stays FP.
SELECTING_SETUPS = ('linear_inputs', 'matmul_inputs')
LINEAR_WEIGHTS = ('q', 'k', 'v', 'g', 'f', 'h')        # the Dense layers inside the layers
QMETHODS = ('symmetric_uniform', 'asymmetric_uniform')
WEIGHT_ESTIMATORS = ('current_minmax', 'running_minmax', 'allminmax', 'percentile', 'mse')
ACT_ESTIMATORS = ('current_minmax', 'running_minmax', 'allminmax', 'percentile', 'mse',
                  'cross_entropy')
MSE_SEARCHES = ('grid', 'golden')
# Estimators that use quant.percentile: running_minmax with percentile p > 0 averages (EMA) the
# per-batch (100 - p, p) percentiles instead of min / max, i.e. the 'percentile' estimator.
PERCENTILE_ESTIMATORS = ('percentile', 'running_minmax')
GRAN_RE = re.compile(r'^(per_tensor|per_embd|per_token|ng(\d+)|ngp(\d+))$')
KEY_RE = re.compile(r'^([A-Za-z]+?)(\d+)?$')

# The originals' defaults; configs/base.py quant_defaults() holds the same values (a test
# checks). The last four are oqt_jax additions (the original CLI flags --per-embd,
# --per-groups N [--per-groups-permute], --per-groups-permute-shared-h, --weight-opt-method,
# --num-candidates).
QUANT_DEFAULTS = dict(
    n_bits=8, n_bits_act=8, qmethod='symmetric_uniform', qmethod_acts='asymmetric_uniform',
    ranges_weights='current_minmax', ranges_acts='running_minmax', percentile=-1.0,
    momentum=0.9, est_num_batches=16, per_channel=False, quant_setup='all', quant_dict='',
    dynamic=False, int8=False)
EXTRA_DEFAULTS = dict(act_granularity='per_tensor', permute_shared_h=False, mse_search='grid',
                      num_candidates=100, symmetric_signed=False,
                      # AdaRound (quant/methods/adaround.py): the originals' defaults.
                      adaround=False, adaround_iters=1000, adaround_samples=1024,
                      adaround_lambda=0.01, adaround_beta=(20.0, 2.0), adaround_warmup=0.2,
                      adaround_lr=1e-3,
                      # QAT (quant/methods/qat.py): train.py trains the quantized model.
                      qat=False, learn_ranges='none')
LEARN_RANGES = ('none', 'fixed', 'minmax', 'lsq', 'lsq+')
# n_bits_act=32: activations stay floating point (W4A32).
FP_ACT_BITS = 32


def _quant_dict_field(value=''):
  """quant_dict accepts the string form (command line) and a Python dict."""
  return ml_collections.FieldReference(value, field_type=object)
# Quantization methods (quant/methods): which one eval.py runs, and their knobs (Outlier
# Suppression's Token-Wise Clipping fine stage; SmoothQuant's migration strength).
EXTRA_DEFAULTS.update(method='', twc_fine=True, twc_lr=1e-5, twc_epochs=3,
                      smoothquant_alpha=0.5)
# Weight-only int8 and LLM.int8() (weight-quantization article; quant/weight_int8.py, methods/llm_int8.py).
EXTRA_DEFAULTS.update(weight_only=False, llm_int8_threshold=6.0)


def assemble(**overrides) -> ml_collections.ConfigDict:
  """A `config.quant` ConfigDict, not yet validated: the originals' defaults, then `overrides`
  (each of a known field and of its default's type)."""
  q = ml_collections.ConfigDict(dict(QUANT_DEFAULTS, **EXTRA_DEFAULTS))
  q.quant_dict = _quant_dict_field()
  for k, v in overrides.items():
    if k not in q:
      raise ConfigError(f'quant.{k}: unknown field (known: {", ".join(sorted(q))})')
    try:
      q[k] = v
    except TypeError:
      raise ConfigError(f'quant.{k}={v!r}: expected a {type(q[k]).__name__} like the default '
                        f'{q[k]!r}') from None
  return q


def config(**overrides) -> ml_collections.ConfigDict:
  """A validated `config.quant` ConfigDict: the originals' defaults, then `overrides`."""
  q = assemble(**overrides)
  validate_quant_config(q)
  return q


# ---- the resolved quant config ---------------------------------------------------------------
class QuantConfig(ml_collections.ConfigDict):
  """A quant config that has passed validate_quant_config, as `resolved()` returns it.

  The layers below the door (Rules.build, QuantHooks.build, calibrate, the methods) take it as
  it is; any other config they are given is validated there, once. Read-only, copies
  (copy_and_resolve_references, also of a config holding it) included: `derive(q, ...)` makes
  a changed copy."""

  def __setitem__(self, key, value):
    if self.__dict__.get('_sealed', False):
      raise TypeError(f'quant.{key}: a resolved quant config is read-only '
                      f'(points.derive(q, {key}=...) makes a changed copy)')
    super().__setitem__(key, value)

  def copy_and_resolve_references(self, visit_map=None):
    return _seal(_plain(self, visit_map))


def _plain(q, visit_map=None) -> ml_collections.ConfigDict:
  """A mutable ConfigDict copy of `q`."""
  if not isinstance(q, ml_collections.ConfigDict):
    return ml_collections.ConfigDict(dict(q))
  c = ml_collections.ConfigDict.copy_and_resolve_references(q, visit_map)
  object.__setattr__(c, '__class__', ml_collections.ConfigDict)
  object.__setattr__(c, '_sealed', False)
  return c


def _seal(c: ml_collections.ConfigDict) -> QuantConfig:
  object.__setattr__(c, '__class__', QuantConfig)
  object.__setattr__(c, '_sealed', True)
  return c


def is_resolved(qcfg) -> bool:
  return isinstance(qcfg, QuantConfig) and qcfg.__dict__.get('_sealed', False)


def resolved(qcfg) -> QuantConfig:
  """`qcfg` (a quant config or a full config with .quant) validated, as a read-only
  QuantConfig; a QuantConfig is returned as it is (validated when it was made)."""
  if is_resolved(qcfg):
    return qcfg
  if 'quant' in qcfg and not isinstance(qcfg['quant'], (str, int, float, bool)):
    qcfg = qcfg['quant']
    if is_resolved(qcfg):
      return qcfg
  validate_quant_config(qcfg)
  return _seal(_plain(qcfg))


def derive(qcfg, **changes) -> QuantConfig:
  """A resolved copy of the resolved `qcfg` with `changes`: for the settings a method makes
  itself (AdaRound's MSE-grid weight ranges, PEG's groups), valid by construction, so not
  validated again."""
  c = _plain(resolved(qcfg))
  with c.unlocked():
    for k, v in changes.items():
      c[k] = v
  return _seal(c)


def _get(q, field):
  if field in q:
    return q[field]
  return dict(QUANT_DEFAULTS, **EXTRA_DEFAULTS)[field]


# ---- parsing ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Override:
  """One quant_dict entry, parsed: what it sets."""
  bits: Optional[int] = None          # None: unchanged
  enabled: Optional[bool] = None
  granularity: Optional[str] = None   # 'per_tensor' | 'per_embd' | 'per_token' | 'groups'
  n_groups: int = 0
  permute: bool = False


def parse_value(key: str, value, field: str = 'quant.quant_dict') -> Override:
  if isinstance(value, bool):
    raise ConfigError(f'{field}: {key!r}: {value!r} is not a bit width, fp32 or a granularity')
  if isinstance(value, int):
    if value == 32:
      return Override(enabled=False)
    if not 2 <= value <= 16:
      raise ConfigError(f'{field}: {key!r}: {value} bits; expected 2..16 or 32 (= fp32)')
    return Override(bits=value, enabled=True)
  if isinstance(value, str):
    v = value.strip()
    if v.lower() in ('fp32', 'fp', 'float32'):
      return Override(enabled=False)
    if v.isdigit():
      return parse_value(key, int(v), field)
    m = GRAN_RE.match(v)
    if m:
      if m.group(1) in ('per_tensor', 'per_embd', 'per_token'):
        return Override(granularity=m.group(1))
      k = int(m.group(2) or m.group(3))
      if k < 1:
        raise ConfigError(f'{field}: {key!r}: {value!r} needs at least 1 group')
      return Override(granularity='groups', n_groups=k, permute=m.group(3) is not None)
  raise ConfigError(f"{field}: {key!r}: {value!r}; expected bits (int), 'fp32', 'per_tensor', "
                    "'per_embd', 'per_token', 'ngK' or 'ngpK'")


def parse_key(key: str, field: str = 'quant.quant_dict') -> tuple[str, Optional[int]]:
  """'y11' -> ('y', 11); 'Et' -> ('Et', None); 'wq3' -> ('wq', 3); validates the name."""
  m = KEY_RE.match(str(key))
  if not m:
    raise ConfigError(f'{field}: unknown point {key!r}')
  base, idx = m.group(1), m.group(2)
  layer = None if idx is None else int(idx)
  act = base[1:] if base.startswith('w') and base != 'w' else base
  is_weight = base.startswith('w') and base != 'w'
  known_layer = set(ALL_LAYER_ACTS) | {'L'}
  if base in ALL_TABLES or (is_weight and act in WEIGHTED and act in ALL_GLOBAL_ACTS):
    if layer is not None:
      raise ConfigError(f'{field}: point {key!r}: {base!r} is not a per-layer point')
    return base, None
  if (is_weight and act in WEIGHTED and act in ALL_LAYER_ACTS) or base in known_layer:
    return base, layer
  if base in ALL_GLOBAL_ACTS:
    if layer is not None:
      raise ConfigError(f'{field}: point {key!r}: {base!r} is not a per-layer point')
    return base, None
  known = sorted(set(ALL_LAYER_ACTS) | set(ALL_GLOBAL_ACTS) | set(ALL_TABLES) | {'L'}
                 | {'w' + a for a in WEIGHTED})
  raise ConfigError(f'{field}: unknown point {key!r} (known: {", ".join(known)}, with an '
                    'optional layer index)')


def parse_quant_dict(spec) -> tuple[tuple[str, Optional[int], Override], ...]:
  """"{'y': 16, 'h': 'ngp6', 'L10': 'fp32'}" (or a dict) -> ((base, layer, Override), ...)."""
  field = 'quant.quant_dict'
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return ()
  if isinstance(spec, str):
    try:
      d = ast.literal_eval(spec.strip())
    except (ValueError, SyntaxError) as e:
      raise ConfigError(f"{field}={spec!r}: not a dict literal like \"{{'y': 16, 'h': 'ngp6'}}\""
                        f' ({type(e).__name__})') from None
  elif isinstance(spec, Mapping):
    d = dict(spec)
  else:
    d = spec
  if hasattr(d, 'to_dict'):
    d = d.to_dict()
  if not isinstance(d, dict):
    raise ConfigError(f'{field}={spec!r}: expected a dict of point -> value')
  out = []
  for k, v in d.items():
    base, layer = parse_key(k, field)
    ov = parse_value(k, v, field)
    if (base in ALL_TABLES or base.startswith('w')) and ov.granularity is not None:
      raise ConfigError(f'{field}: {k!r}: {v!r}; weight points take bits or fp32 only '
                        '(per-channel weights: quant.per_channel)')
    out.append((base, layer, ov))
  return tuple(out)


def parse_granularity(value, field='quant.act_granularity') -> Override:
  m = GRAN_RE.match(str(value))
  if not m:
    raise ConfigError(f"{field}={value!r}: expected 'per_tensor', 'per_embd', 'per_token', 'ngK' "
                      "or 'ngpK'")
  return parse_value('*', str(value), field)


# ---- validation ------------------------------------------------------------------------------
def validate_quant_config(config) -> None:
  """Checks a full config (with .quant) or a quant ConfigDict; raises ConfigError."""
  q = config.quant if 'quant' in config else config
  known = set(QUANT_DEFAULTS) | set(EXTRA_DEFAULTS)
  for k in q:
    if k not in known:
      raise ConfigError(f'quant.{k}: unknown field (known: {", ".join(sorted(known))})')

  def bad(field, msg):
    raise ConfigError(f'quant.{field}={_get(q, field)!r}: {msg}')

  for f in ('n_bits', 'n_bits_act'):
    v = _get(q, f)
    if f == 'n_bits_act' and v == FP_ACT_BITS and not isinstance(v, bool):
      continue   # floating-point activations (W4A32)
    if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 16:
      bad(f, 'expected an integer bit width in 2..16' + (' or 32 (floating point)'
                                                         if f == 'n_bits_act' else ''))
  for f in ('qmethod', 'qmethod_acts'):
    if _get(q, f) not in QMETHODS:
      bad(f, f'expected one of {QMETHODS}')
  if _get(q, 'ranges_weights') not in WEIGHT_ESTIMATORS:
    bad('ranges_weights', f'expected one of {WEIGHT_ESTIMATORS}')
  if _get(q, 'ranges_acts') not in ACT_ESTIMATORS:
    bad('ranges_acts', f'expected one of {ACT_ESTIMATORS}')
  p = float(_get(q, 'percentile'))
  ests = (_get(q, 'ranges_acts'), _get(q, 'ranges_weights'))
  uses_pct = 'percentile' in ests
  if uses_pct and not 50.0 < p <= 100.0:
    bad('percentile', "the 'percentile' estimator needs a percentile in (50, 100], e.g. 99.999")
  if not uses_pct and p > 0 and not 50.0 < p <= 100.0:
    bad('percentile', 'expected -1 (unused) or a percentile in (50, 100]')
  # A percentile means something with the 'percentile' estimator, or with running_minmax
  # (then the EMA runs over per-batch percentiles, as the originals' OPT recipe); with any
  # other estimator it would be silently ignored.
  if p > 0 and not any(e in PERCENTILE_ESTIMATORS for e in ests):
    raise ConfigError(f'quant.percentile={p!r} with quant.ranges_acts={ests[0]!r} and '
                      f'quant.ranges_weights={ests[1]!r}: a percentile is used only by the '
                      "'percentile' and 'running_minmax' estimators (set percentile=-1)")
  if not 0.0 <= float(_get(q, 'momentum')) < 1.0:
    bad('momentum', 'must be in [0, 1)')
  n = _get(q, 'est_num_batches')
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    bad('est_num_batches', 'must be a positive integer')
  if _get(q, 'quant_setup') not in QUANT_SETUPS:
    bad('quant_setup', f'expected one of {QUANT_SETUPS}')
  parse_quant_dict(_get(q, 'quant_dict'))
  parse_granularity(_get(q, 'act_granularity'))
  if _get(q, 'mse_search') not in MSE_SEARCHES:
    bad('mse_search', f'expected one of {MSE_SEARCHES}')
  nc = _get(q, 'num_candidates')
  if isinstance(nc, bool) or not isinstance(nc, int) or nc < 2:
    bad('num_candidates', 'must be an integer >= 2')
  for f in ('per_channel', 'dynamic', 'int8', 'permute_shared_h', 'symmetric_signed'):
    if not isinstance(_get(q, f), bool):
      bad(f, 'expected True or False')
  if not isinstance(_get(q, 'weight_only'), bool):
    bad('weight_only', 'expected True or False')
  th = _get(q, 'llm_int8_threshold')
  if isinstance(th, bool) or not isinstance(th, (int, float)) or not th > 0:
    bad('llm_int8_threshold', 'must be a number > 0 (inf: no outlier dims)')
  if _get(q, 'int8') and _get(q, 'n_bits') > 8:
    bad('int8', f'int8 matmuls need n_bits <= 8, got n_bits={_get(q, "n_bits")}')
  if _get(q, 'int8') and _get(q, 'qmethod') != 'symmetric_uniform':
    bad('int8', "int8 matmuls need symmetric weights (quant.qmethod='symmetric_uniform')")
  _validate_methods(q, bad)


def _validate_methods(q, bad) -> None:
  """The AdaRound and QAT fields."""
  for f in ('adaround', 'qat'):
    if not isinstance(_get(q, f), bool):
      bad(f, 'expected True or False')
  for f in ('adaround_iters', 'adaround_samples'):
    v = _get(q, f)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      bad(f, 'must be > 0')
  for f in ('adaround_lambda', 'adaround_lr'):
    v = _get(q, f)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
      bad(f, 'must be > 0')
  w = _get(q, 'adaround_warmup')
  if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < 1:
    bad('adaround_warmup', 'must be a fraction of the iterations in [0, 1)')
  b = _get(q, 'adaround_beta')
  ok = (isinstance(b, (tuple, list)) and len(b) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in b))
  if not ok or not b[0] >= b[1] > 0:
    bad('adaround_beta', 'expected (start, end) with start >= end > 0, e.g. (20, 2)')
  if _get(q, 'learn_ranges') not in LEARN_RANGES:
    bad('learn_ranges', f'expected one of {LEARN_RANGES}')
  if not isinstance(_get(q, 'method'), str):   # the name: methods.check_name (the registry)
    bad('method', 'expected a method name (oqt_jax.quant.methods.names())')
  if not isinstance(_get(q, 'twc_fine'), bool):
    bad('twc_fine', 'expected True or False')
  lr = _get(q, 'twc_lr')
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
    bad('twc_lr', 'must be > 0')
  ep = _get(q, 'twc_epochs')
  if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
    bad('twc_epochs', 'must be an integer >= 1')
  a = _get(q, 'smoothquant_alpha')
  if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
    bad('smoothquant_alpha', 'must be in [0, 1]')


# ---- resolution ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PointSpec:
  """How one point is quantized."""
  name: str
  kind: str                   # 'weight' | 'act'
  enabled: bool
  n_bits: int
  symmetric: bool
  granularity: str            # 'per_tensor' | 'per_channel' (weights) | 'per_embd' | 'per_token'
                              # (always dynamic) | 'groups'
  estimator: str
  n_groups: int = 0
  permute: bool = False
  perm_source: Optional[str] = None   # the point whose FP per-dim ranges define the permutation
  mse_search: Optional[str] = None    # MSE / CE search of this point; None: quant.mse_search
  signed: Optional[bool] = None       # symmetric grid: True signed always; None: signed iff
                                      # x_min < 0 (quant.symmetric_signed)

  @property
  def x_neg(self) -> Optional[bool]:
    """The `x_neg` argument of quantizers.quantize_dequantize for this point."""
    return True if (self.symmetric and self.signed) else None


def split_name(name: str) -> tuple[str, str, Optional[int]]:
  """Point name -> (kind, base, layer).

  'wq3' -> ('weight', 'q', 3); 'Et' -> ('weight', 'Et', None); 'h3' -> ('act', 'h', 3).
  """
  if name in ALL_TABLES:
    return 'weight', name, None
  m = KEY_RE.match(name)
  if not m:
    raise ValueError(f'not a quantization point name: {name!r}')
  base, idx = m.group(1), m.group(2)
  layer = None if idx is None else int(idx)
  if base.startswith('w') and base[1:] in WEIGHTED:
    return 'weight', base[1:], layer
  return 'act', base, layer


@dataclasses.dataclass(frozen=True)
class Rules:
  """The resolved quantization setup of one model; hashable (a Flax module attribute)."""
  model_type: str
  num_layers: int
  final_ln: str
  n_bits: int
  n_bits_act: int
  symmetric_weights: bool
  symmetric_acts: bool
  per_channel: bool
  ranges_weights: str
  ranges_acts: str
  act_default: Override
  quant_setup: str
  overrides: tuple
  permute_shared_h: bool
  percentile: float
  momentum: float
  mse_search: str
  num_candidates: int
  dynamic: bool
  int8: bool
  running_percentile: bool = False    # running_minmax means an EMA of per-batch percentiles
  pre_ln: bool = True                 # OPT: do_layer_norm_before (the selecting setups)
  projects: bool = False              # OPT: project_in / project_out exist
  symmetric_signed: bool = False      # symmetric quantizers always on the signed grid

  @classmethod
  def build(cls, qcfg, model_cfg) -> 'Rules':
    qcfg = resolved(qcfg)
    g = lambda f: _get(qcfg, f)
    mtype = model_cfg.model_type
    nl = int(model_cfg.num_layers)
    if mtype == 'bert':
      final_ln = f'z{nl - 1}'
    elif model_cfg.do_layer_norm_before:
      final_ln = 'fln'
    else:
      final_ln = f'x{nl - 1}'
    pct = float(g('percentile'))
    return cls(
        model_type=mtype, num_layers=nl, final_ln=final_ln, n_bits=int(g('n_bits')),
        n_bits_act=int(g('n_bits_act')), symmetric_weights=g('qmethod') == 'symmetric_uniform',
        symmetric_acts=g('qmethod_acts') == 'symmetric_uniform', per_channel=bool(g('per_channel')),
        ranges_weights=g('ranges_weights'), ranges_acts=g('ranges_acts'),
        act_default=parse_granularity(g('act_granularity')), quant_setup=g('quant_setup'),
        overrides=parse_quant_dict(g('quant_dict')), permute_shared_h=bool(g('permute_shared_h')),
        percentile=pct if pct > 0 else 99.999, momentum=float(g('momentum')),
        mse_search=g('mse_search'), num_candidates=int(g('num_candidates')),
        dynamic=bool(g('dynamic')), int8=bool(g('int8')), running_percentile=pct > 0,
        pre_ln=bool(getattr(model_cfg, 'do_layer_norm_before', True)),
        projects=mtype == 'opt' and model_cfg.embed_dim != model_cfg.hidden_size,
        symmetric_signed=bool(g('symmetric_signed')))

  # -- per point ---------------------------------------------------------------------------
  @functools.lru_cache(maxsize=None)
  def spec(self, name: str) -> PointSpec:
    kind, base, layer = split_name(name)
    if kind == 'weight':
      return self._weight_spec(name, base, layer)
    return self._act_spec(name, base, layer)

  def _matching(self, keys):
    """Overrides whose (base, layer) is in `keys`, least specific first (keys are ranked)."""
    out = []
    for rank, key in enumerate(keys):
      for b, l, ov in self.overrides:
        if (b, l) == key:
          out.append(ov)
    return out

  def _int16_ln(self, base, act_name) -> bool:
    """True where quant_setup puts this LayerNorm (output and gamma) at 16 bits."""
    if self.quant_setup == 'fp32_head+int16_final_LN':
      return act_name == self.final_ln
    if self.quant_setup == 'fp32_head+int16_all_LN':
      return base in LN_ACTS and base not in HEAD
    return False

  @functools.lru_cache(maxsize=None)
  def selected(self) -> Optional[frozenset]:
    """The points a selecting quant_setup quantizes (module docstring), or None (every
    point, the other setups). BERT's set names both heads' points (a model has one)."""
    setup, n, t = self.quant_setup, self.num_layers, self.model_type
    if setup not in SELECTING_SETUPS:
      return None
    layers = range(n)
    per_layer = lambda bases, upto=n: {f'{b}{i}' for b in bases for i in range(upto)}
    weights = {f'w{b}{i}' for b in LINEAR_WEIGHTS for i in layers}
    if setup == 'linear_inputs':
      if t == 'bert':
        acts = {'eln'} | per_layer('z', n - 1) | per_layer('cxf')
      elif self.pre_ln:
        acts = per_layer('acxf')
      else:
        acts = {'e'} | per_layer('x', n - 1) | per_layer('acf')
      return frozenset(acts | weights)
    # matmul_inputs
    if t == 'bert':
      acts = {'eln', 'P', 'Mln'} | per_layer('qkvpcxfz')
      weights |= {'Et', 'Ep', 'Ets', 'wP', 'wC', 'wMt', 'wM'}
    else:
      acts = per_layer('qkvpcafx') | ({'fln'} if self.pre_ln else {'e'})
      weights |= {'Et', 'Ep', 'wM'}
      if self.projects:
        acts |= {'pout'}
        weights |= {'wpin', 'wpout'}
    return frozenset(acts | weights)

  def _weight_spec(self, name, base, layer) -> PointSpec:
    enabled = True
    bits = self.n_bits
    est, search = self.ranges_weights, None
    if self.quant_setup.startswith('fp32_head') and base in HEAD:
      enabled = False
    if self.selected() is not None and name not in self.selected():
      enabled = False
    if base not in ALL_TABLES and self._int16_ln(base, name[1:]):
      bits = 16
    wb = base if base in ALL_TABLES else 'w' + base
    keys = [('L', None), (wb, None), ('L', layer), (wb, layer)] if layer is not None else \
           [(wb, None)]
    matching = self._matching(keys)
    for ov in matching:
      if ov.enabled is not None:
        enabled = ov.enabled
      if ov.bits is not None:
        bits = ov.bits
    if base == 'Et' and matching and self.model_type == 'bert':
      est, search = 'mse', 'golden'
    gran = 'per_channel' if self.per_channel else 'per_tensor'
    if est == 'running_minmax' and self.running_percentile:
      est = 'percentile'
    return PointSpec(name=name, kind='weight', enabled=enabled, n_bits=bits,
                     symmetric=self.symmetric_weights, granularity=gran,
                     estimator=est, mse_search=search,
                     signed=True if self.symmetric_signed else None)

  def _act_spec(self, name, base, layer) -> PointSpec:
    enabled, bits, est = True, self.n_bits_act, self.ranges_acts
    if bits == FP_ACT_BITS:         # W4A32: activations in floating point unless overridden
      enabled, bits = False, 8
    d = self.act_default
    gran, ng, perm = d.granularity or 'per_tensor', d.n_groups, d.permute
    setup = self.quant_setup
    search = None
    if setup.startswith('fp32_head') and base in HEAD:
      enabled = False
    if self.selected() is not None and name not in self.selected():
      enabled = False
    if self._int16_ln(base, name):
      bits = 16
    if base in LOGITS:
      if setup == 'FP_logits':
        enabled = False
      elif setup == 'MSE_logits':
        est, search = 'mse', 'golden'
      elif setup == 'CE_logits':
        est = 'cross_entropy'
    keys = ([('L', None), (base, None), ('L', layer), (base, layer)] if layer is not None
            else [('e', None), (base, None)] if base == 'ewt' else [(base, None)])
    for ov in self._matching(keys):
      if ov.enabled is not None:
        enabled = ov.enabled
      if ov.bits is not None:
        bits = ov.bits
      if ov.granularity is not None:
        gran, ng, perm = ov.granularity, ov.n_groups, ov.permute
    if gran in ('per_tensor', 'per_embd', 'per_token'):
      ng, perm = 0, False
    if est == 'running_minmax' and self.running_percentile:
      est = 'percentile'     # EMA of the per-batch percentiles (see PERCENTILE_ESTIMATORS)
    source = None
    if gran == 'groups' and perm:
      shared = self.permute_shared_h and layer is not None and base in ('x', 'h', 'y')
      source = f'h{layer}' if shared else name
    if gran == 'per_token':
      est = 'current_minmax'    # always dynamic: each row's range from the current tensor
    return PointSpec(name=name, kind='act', enabled=enabled, n_bits=bits,
                     symmetric=self.symmetric_acts, granularity=gran, estimator=est,
                     n_groups=ng, permute=perm, perm_source=source, mse_search=search,
                     signed=True if self.symmetric_signed else None)

  # -- model-wide ----------------------------------------------------------------------------
  def act_points(self) -> tuple[str, ...]:
    """Every activation point of this model type (head points of all heads included)."""
    t = self.model_type
    names = list(GLOBAL_ACTS[t])
    for i in range(self.num_layers):
      names += [f'{b}{i}' for b in LAYER_ACTS[t]]
    return tuple(names)

  def weight_points(self) -> tuple[str, ...]:
    names = list(TABLES[self.model_type])
    for n in self.act_points():
      kind, base, layer = split_name(n)
      if base in WEIGHTED:
        names.append('w' + n)
    return tuple(names)

  @functools.lru_cache(maxsize=None)
  def stats_points(self) -> frozenset:
    """Points whose FP per-dimension ranges the permutation pass must collect."""
    return frozenset(self.spec(n).perm_source for n in self.act_points()
                     if self.spec(n).perm_source is not None)

  @property
  def needs_permutation(self) -> bool:
    return bool(self.stats_points())

  def table(self) -> list[PointSpec]:
    return [self.spec(n) for n in self.weight_points() + self.act_points()]


def describe(rules: Rules, only_changed: bool = True) -> str:
  """A readable table of the resolved points (those differing from the plain default).

  The first line names the quant_setup (and, for the selecting setups, which points it
  quantizes); consecutive layers of one point resolved alike share a row ('f0..f11').
  """
  head = f'quant_setup={rules.quant_setup}'
  if rules.symmetric_signed:
    head += ', symmetric quantizers on the signed grid'
  if rules.selected() is not None:
    on = [s.name for s in rules.table() if s.enabled]
    head += ': quantized ' + (_compact(on) or 'nothing') + '; every other point fp32'
  rows = []
  for s in rules.table():
    base_bits = rules.n_bits if s.kind == 'weight' else rules.n_bits_act
    default_gran = ('per_channel' if rules.per_channel else 'per_tensor') if s.kind == 'weight' \
        else (rules.act_default.granularity or 'per_tensor')
    changed = (not s.enabled or s.n_bits != base_bits or s.granularity != default_gran
               or s.estimator != (rules.ranges_weights if s.kind == 'weight' else
                                  rules.ranges_acts))
    if rules.selected() is not None and not s.enabled:
      changed = False          # named in the first line
    if only_changed and not changed:
      continue
    if not s.enabled:
      what = 'fp32'
    else:
      what = f'{s.n_bits}b {s.granularity}'
      if s.granularity == 'groups':
        what += f'({s.n_groups}{", permuted by " + s.perm_source if s.permute else ""})'
      what += ' dynamic' if s.granularity == 'per_token' else f' {s.estimator}'
    rows.append((s.name, what))
  lines = [head]
  for label, what in _runs(rows):
    lines.append(f'  {label:>6}  {what}')
  return '\n'.join(lines)


def _runs(items):
  """[(name, what)] -> [(label, what)]: per point (first appearance order), the layers in
  runs of consecutive indices resolved alike ('f0..f11')."""
  groups = {}
  for name, what in items:
    kind, base, layer = split_name(name)
    groups.setdefault((kind, base, name if layer is None else ''), []).append(
        (layer, what, name))
  out = []
  for (_, base, _), members in groups.items():
    members.sort(key=lambda m: -1 if m[0] is None else m[0])
    run = None
    for layer, what, name in members:
      if run and layer is not None and run[1] == layer - 1 and run[2] == what:
        run[1] = layer
        continue
      if run:
        out.append(run)
      run = [layer, layer, what, name]
    if run:
      out.append(run)
  label = lambda r: r[3] if r[0] == r[1] else f'{r[3]}..{r[3][:-len(str(r[0]))]}{r[1]}'
  return [(label(r), r[2]) for r in out]


def _compact(names) -> str:
  """['a0', 'a1', 'c0', 'eln'] -> 'a0..a1, c0, eln' (runs of consecutive layers)."""
  return ', '.join(label for label, _ in _runs([(n, '') for n in names]))
