"""QuantHooks: the models' quantization-hook protocol, backed by the Flax 'quant' collection.

  qmodel = model.clone(quant=QuantHooks.build(qcfg, model.cfg, mode='frozen'))

Every point keeps its state in the 'quant' collection of the module that calls the hook,
under the point's name (e.g. quant/encoder_layer_3/output/h3):
  activations  {'x_min', 'x_max', 'n'} (shape () per tensor, (D,) per embedding, (K,) per
               embedding group: the estimator runs on the group's own values,
               quantizers.group_values), plus 'group_ids' (D,) for permuted PEG and 'fp'
               {'range' (D,), 'n'} (per-dim FP range max - min of each calibration batch,
               averaged over the batches) on the points the permutation is measured on;
               'per_token' points keep no range (one range per row, from the current
               tensor in every mode, see _act_per_token);
  weights      {'x_min', 'x_max', 'n'} of the weight (per tensor or per output channel);
  int8 inputs  'in_<point>' {'x_min', 'x_max', 'n'}: the static range of a Dense layer's input
               used by the int8 matmul (int8.py).

Modes:
  'init'         creates every state (weights: their ranges, computed from the weights once),
                 no quantization;
  'stats'        floating-point pass collecting per-dim FP ranges for PEG permutations;
  'calibrating'  estimators update from the batch (padding masked), then quantize with them;
  'frozen'       quantize with the stored ranges (read only);
  'dynamic'      activation ranges from the current batch alone (the estimator on a fresh
                 state), weights and permutations from the store;
  'fp'           hooks are identities (a floating-point run of a quantized model);
  'learned'      QAT (quant/methods/qat.py), by learn_ranges: 'none' re-estimates every range
                 from the current tensors (activations as 'calibrating'; weights: the weight
                 estimator on the current weights, from the stored state) and writes it (the
                 collection must be mutable); 'fixed' is 'frozen'; otherwise as 'frozen', for
                 a 'quant' collection that the train step differentiates. A state {'delta',
                 'zero_float' (asymmetric only), 'q_min', 'q_max'} is the original's uniform
                 quantizer with learnable delta / zero_float (quantizers.minmax_quantize,
                 'minmax'); a state {'scale', 'zero_point' (asymmetric only), 'q_min',
                 'q_max'} is the LSQ quantizer with the gradient scale
                 1/sqrt(numel_per_scale * q_max) ('lsq': the zero-point is constant; 'lsq+':
                 learned too, rounded with the STE). 'frozen' reads every form (an exported
                 QAT model).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from oqt_jax.errors import ConfigError
from oqt_jax.quant import estimators, int8, lsq, quantizers
from oqt_jax.quant.layout import (COLLECTION, TIED_TABLES, token_mask_for,  # noqa: F401
                                  weight_reduce_axes)
from oqt_jax.quant.points import Rules

MODES = ('init', 'stats', 'calibrating', 'frozen', 'dynamic', 'fp', 'learned')


def fp_range_update(state, x, mask):
  """Permutation statistics: the running mean over batches of each dim's FP range (max - min
  over the batch's valid tokens). A batch without valid tokens is skipped."""
  axes = tuple(range(x.ndim - 1))
  mask = estimators.compact_mask(mask, x.shape) if mask is not None else None
  mn, mx, valid = estimators.masked_min_max(x, mask, axes)
  seen = jnp.any(valid)
  n = state['n']
  r = jnp.where(valid, mx - mn, 0.0)
  mean = state['range'] + (r - state['range']) / (n + 1).astype(jnp.float32)
  return {'range': jnp.where(seen, mean, state['range']), 'n': n + seen.astype(jnp.int32)}


@dataclasses.dataclass(frozen=True)
class QuantHooks:
  """Implements quant.weight / quant.act / quant.dot_general (see models/layers.py)."""
  rules: Rules
  mode: str = 'frozen'
  int8_backend: str = 'aqt'     # 'aqt' (int8 matmuls) | 'fake' (the same arithmetic in float)
  learn_ranges: str = 'none'    # mode 'learned': which range parameters get gradients

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'QuantHooks.mode must be one of {MODES}, got {self.mode!r}')
    if self.int8_backend not in ('aqt', 'fake'):
      raise ValueError(f"int8_backend must be 'aqt' or 'fake', got {self.int8_backend!r}")

  @classmethod
  def build(cls, qcfg, model_cfg, mode: Optional[str] = None, **kw) -> 'QuantHooks':
    rules = Rules.build(qcfg, model_cfg)
    if mode is None:
      mode = 'dynamic' if rules.dynamic else 'frozen'
    return cls(rules=rules, mode=mode, **kw)

  def with_mode(self, mode: str) -> 'QuantHooks':
    return dataclasses.replace(self, mode=mode)

  @property
  def eval_mode(self) -> str:
    return 'dynamic' if self.rules.dynamic else 'frozen'

  # ---- helpers -------------------------------------------------------------------------------
  def _update(self, spec, state, x, mask, axes, n_bits=None, symmetric=None, kind=None):
    r = self.rules
    return estimators.update(
        kind or spec.estimator, state, x, mask=mask, reduce_axes=axes, momentum=r.momentum,
        percentile=r.percentile, n_bits=n_bits or spec.n_bits,
        symmetric=spec.symmetric if symmetric is None else symmetric,
        mse_search=spec.mse_search or r.mse_search, num_candidates=r.num_candidates,
        signed=bool(spec.signed))

  @staticmethod
  def _ranges(state, ndim, axes):
    return (quantizers.expand_range(state['x_min'], ndim, axes),
            quantizers.expand_range(state['x_max'], ndim, axes))

  @staticmethod
  def _read(module, name, what):
    if not module.has_variable(COLLECTION, name):
      raise ValueError(f"quantization point {name!r} ({what}) has no state in the 'quant' "
                       'collection: calibrate the model first (oqt_jax.quant.calibrate)')
    return module.get_variable(COLLECTION, name)

  # ---- weights ---------------------------------------------------------------------------------
  def weight_state(self, name, w):
    """The weight's range state computed from the weight itself (no data needed)."""
    spec = self.rules.spec(name)
    axes = weight_reduce_axes(name, w, self.rules.per_channel)
    shape = tuple(d for i, d in enumerate(w.shape) if i not in axes)
    return self._update(spec, estimators.init_state(shape), w, None, axes), axes

  def _tied_state(self, module, name):
    """The state this module already holds for its table under another point quantized
    alike (an Embed module has one table: the word embeddings 'Et' and their tied decoder
    'wM' are the same array), so the range search is not run twice; None otherwise."""
    if name not in TIED_TABLES:
      return None
    same = lambda spec: dataclasses.replace(spec, name='')
    for other in TIED_TABLES:
      if (other != name and module.has_variable(COLLECTION, other)
          and same(self.rules.spec(other)) == same(self.rules.spec(name))):
        return dict(module.get_variable(COLLECTION, other))
    return None

  def weight(self, module, name, w):
    spec = self.rules.spec(name)
    if not spec.enabled or self.mode in ('fp', 'stats'):
      return w
    if self.mode == 'init':
      state = self._tied_state(module, name)
      if state is None:
        state, _ = self.weight_state(name, w)
      module.put_variable(COLLECTION, name, state)
      return w
    if module.has_variable(COLLECTION, name):
      state = module.get_variable(COLLECTION, name)
      axes = weight_reduce_axes(name, w, self.rules.per_channel)
      if self.estimating:          # QAT 'none': the weight estimator on the current weights
        state = dict(state, **self._update(
            spec, {k: state[k] for k in ('x_min', 'x_max', 'n')}, w, None, axes))
        module.put_variable(COLLECTION, name, state)
    else:   # not calibrated: ranges from the weight itself, every call
      state, axes = self.weight_state(name, w)
    if 'scale' in state:            # learned step size (QAT with LSQ / LSQ+)
      return self._lsq(state, w, axes)
    if 'delta' in state:            # learned (delta, zero_float) (QAT 'minmax')
      return self._minmax(state, w, axes)
    x_min, x_max = self._ranges(state, w.ndim, axes)
    return quantizers.quantize_dequantize(w, spec.n_bits, spec.symmetric, x_min, x_max,
                                          x_neg=spec.x_neg)

  def _lsq(self, state, x, axes):
    """x quantized with an LSQ / LSQ+ state (mode 'learned', or 'frozen' on a QAT export)."""
    scale = quantizers.expand_range(state['scale'], x.ndim, axes)
    zp = quantizers.expand_range(state.get('zero_point', jnp.zeros((), jnp.float32)), x.ndim,
                                 axes)       # symmetric quantizers: no zero-point
    q_min = jax.lax.stop_gradient(state['q_min'])
    q_max = jax.lax.stop_gradient(state['q_max'])
    if self.learn_ranges != 'lsq+':
      zp = jax.lax.stop_gradient(zp)
    g = 1.0 / jnp.sqrt(jnp.float32(x.size / max(int(jnp.size(state['scale'])), 1)) * q_max)
    return lsq.lsq_affine_quantize(x, scale, zp, q_min, q_max, g)

  @property
  def estimating(self) -> bool:
    """QAT with learn_ranges='none': the ranges are re-estimated at every training step."""
    return self.mode == 'learned' and self.learn_ranges == 'none'

  def _minmax(self, state, x, axes, gid=None):
    """x quantized with a learned (delta, zero_float) state (quantizers.minmax_quantize); per-group
    states (K,) are expanded to the dims with `gid`."""
    delta, zf = state['delta'], state.get('zero_float')
    if gid is not None:
      delta, zf = delta[gid], (None if zf is None else zf[gid])
    else:
      delta = quantizers.expand_range(delta, x.ndim, axes)
      zf = None if zf is None else quantizers.expand_range(zf, x.ndim, axes)
    return quantizers.minmax_quantize(x, delta, zf, jax.lax.stop_gradient(state['q_min']),
                                      jax.lax.stop_gradient(state['q_max']))

  # ---- activations -----------------------------------------------------------------------------
  def keeps_float32(self, name) -> bool:
    """True where the point's grid is finer than bfloat16 / float16 can hold (> 8 bits): its
    quantized output stays float32 under 16-bit compute (the models' layers ask this)."""
    if self.mode in ('fp', 'stats', 'init'):
      return False
    spec = self.rules.spec(name)
    return spec.enabled and spec.n_bits > 8

  def act(self, module, name, x, mask):
    r = self.rules
    spec = r.spec(name)
    mode = self.mode
    if mode == 'fp':
      return x
    needs_stats = name in r.stats_points()
    if not spec.enabled and not needs_stats:
      return x
    m = token_mask_for(x, mask)
    if spec.granularity == 'per_token':
      return self._act_per_token(module, name, spec, x, m, needs_stats)
    d = x.shape[-1]
    per_dim = spec.granularity in ('per_embd', 'groups') and x.ndim in (2, 3)
    grouped = per_dim and spec.granularity == 'groups'
    if grouped and d % spec.n_groups:
      raise ConfigError(f'quant.quant_dict: point {name!r} has {d} dims, not divisible into '
                        f'{spec.n_groups} groups')
    if grouped:   # one range per group, estimated on the group's values (..., K, D/K)
      axes = tuple(a for a in range(x.ndim + 1) if a != x.ndim - 1)
      shape = (spec.n_groups,)
    elif per_dim:
      axes, shape = tuple(range(x.ndim - 1)), (d,)
    else:
      axes, shape = tuple(range(x.ndim)), ()

    if mode == 'init':
      state = {}
      if spec.enabled:
        state.update(estimators.init_state(shape))
        if grouped and spec.permute:
          state['group_ids'] = quantizers.group_index(d, spec.n_groups)
      if needs_stats:
        state['fp'] = {'range': jnp.zeros((d,), jnp.float32), 'n': jnp.zeros((), jnp.int32)}
      module.put_variable(COLLECTION, name, state)
      return x
    if mode == 'stats':
      return self._keep_fp_stats(module, name, x, m, needs_stats)
    if not spec.enabled:
      return x

    gid = None
    if grouped:
      if spec.permute:
        gid = self._read(module, name, 'permutation')['group_ids']
      else:
        gid = quantizers.group_index(d, spec.n_groups)
    xs, ms = x, m
    if grouped:
      xs = quantizers.group_values(x, gid, spec.n_groups)
      ms = token_mask_for(xs, mask)
    rng_keys = ('x_min', 'x_max', 'n')
    if mode == 'calibrating' or self.estimating:
      stored = dict(self._read(module, name, 'range'))
      new = self._update(spec, {k: stored[k] for k in rng_keys}, xs, ms, axes)
      stored.update(new)
      module.put_variable(COLLECTION, name, stored)
      state = stored
    elif mode in ('frozen', 'learned'):
      state = self._read(module, name, 'range')
      if 'scale' in state:
        return self._lsq(state, x, axes)
      if 'delta' in state:
        out_dtype = jnp.float32 if spec.n_bits > 8 else x.dtype
        return self._minmax(state, x.astype(jnp.float32), axes, gid).astype(out_dtype)
    else:  # dynamic: the estimator on this batch alone
      state = self._update(spec, estimators.init_state(shape), xs, ms, axes)
    x_min, x_max = state['x_min'], state['x_max']
    if grouped:
      x_min, x_max = quantizers.expand_group_ranges(x_min, x_max, gid)
    out_dtype = jnp.float32 if spec.n_bits > 8 else x.dtype
    xq = quantizers.quantize_dequantize(x.astype(jnp.float32), spec.n_bits, spec.symmetric,
                                        x_min, x_max, x_neg=spec.x_neg)
    return xq.astype(out_dtype)

  def _keep_fp_stats(self, module, name, x, m, needs_stats):
    """'stats' mode: update the FP range statistics kept for a permutation source."""
    if needs_stats:
      state = dict(self._read(module, name, 'stats'))
      state['fp'] = fp_range_update(state['fp'], x, m)
      module.put_variable(COLLECTION, name, state)
    return x

  def _act_per_token(self, module, name, spec, x, m, needs_stats):
    """act() of a 'per_token' point: one range per row of the last axis, from x itself in
    every mode that quantizes (no state; 'init' / 'stats' only keep a permutation source's FP
    statistics). Within a row, entries the mask marks invalid along the last axis (the keys
    of padding tokens in (B, H, T, T) scores / probabilities) are left out of the range; a
    row without a valid entry (a padding query) uses all its entries."""
    mode = self.mode
    if mode == 'init':
      if needs_stats:
        d = x.shape[-1]
        module.put_variable(COLLECTION, name, {
            'fp': {'range': jnp.zeros((d,), jnp.float32), 'n': jnp.zeros((), jnp.int32)}})
      return x
    if mode == 'stats':
      return self._keep_fp_stats(module, name, x, m, needs_stats)
    if not spec.enabled:
      return x
    xf = jax.lax.stop_gradient(x.astype(jnp.float32))
    x_min = jnp.min(xf, axis=-1, keepdims=True)
    x_max = jnp.max(xf, axis=-1, keepdims=True)
    if m is not None and x.ndim >= 2:
      row = estimators.compact_mask(m, x.shape)
      if row.shape[-1] > 1:     # the mask varies within a row
        lo = jnp.min(jnp.where(row, xf, jnp.inf), axis=-1, keepdims=True)
        hi = jnp.max(jnp.where(row, xf, -jnp.inf), axis=-1, keepdims=True)
        any_valid = jnp.any(row, axis=-1, keepdims=True)
        x_min = jnp.where(any_valid, lo, x_min)
        x_max = jnp.where(any_valid, hi, x_max)
    out_dtype = jnp.float32 if spec.n_bits > 8 else x.dtype
    xq = quantizers.quantize_dequantize(x.astype(jnp.float32), spec.n_bits, spec.symmetric,
                                        x_min, x_max, x_neg=spec.x_neg)
    return xq.astype(out_dtype)

  # ---- int8 matmuls ----------------------------------------------------------------------------
  def dot_general(self, module, name, mask=None):
    if not self.rules.int8 or self.mode in ('fp', 'stats'):
      return None
    return int8.dot_general(self, module, name, mask)   # AQT stays behind this one adapter
