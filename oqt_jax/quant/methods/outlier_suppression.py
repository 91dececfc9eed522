"""Outlier Suppression (Wei et al., NeurIPS 2022): Gamma Migration and Token-Wise Clipping.

  model, variables = quant.gamma_migration(model, variables)
  qmodel, qvariables = quant.token_wise_clipping(model, variables, batches, qcfg)

Gamma Migration
---------------
Each LayerNorm y = gamma * norm(x) + beta that feeds the next Linear layers keeps only
norm(x) + beta / gamma; gamma moves into those Linears' input rows (W[j, :] *= gamma_j) and,
where the LN output also feeds the residual branch (BERT, post-LN OPT), onto it: the residual
add becomes y' * gamma + sublayer(y'). The LN's output quantizer then sees the gamma-free
tensor. The floating-point function is unchanged. Which LayerNorms migrate: migration.py
(the last layer's output LN, OPT's final LN and the MLM head's LN keep their gamma).
Guard: a dim with |gamma_j| < min_gamma (default 1e-5; the original divided by gamma blindly)
is not migrated (f_j = 1: that LN dim keeps its gamma), so beta / gamma never blows up.
The migrated gamma on the residual branch is applied in floating point; the LN's weight
point ('w' + point) quantizes what the LN itself still multiplies (ones on migrated dims).

Token-Wise Clipping (`token_wise_clipping`)
-------------------------------------------
1. Plain calibration (quant.calibrate) creates every point's state: weight ranges, and the
   ranges of the points TWC does not clip (other granularities than per-tensor, int8 inputs).
2. Coarse stage. One floating-point pass over the calibration batches records, for every
   enabled per-tensor activation point, each valid token's max u_t and min l_t over its
   channels (attention scores / probabilities (B, H, Tq, Tk): the token is the query, the
   channels are heads x valid keys). For each candidate ratio p in 1, 1 - 0.01, ...,
   1 - 0.01 * K (K = 10 for >= 8 activation bits, 30 for 6-7, 90 below), per batch:
     U = quantile(|u|, p), L = -quantile(|l|, p)   (numpy 'linear' interpolation)
     upper = max{u_t : u_t <= U},  lower = min{l_t : l_t >= L}
   and the point's range is the mean of lower / upper over the batches (`twc_ratio_ranges`).
   Attention probabilities ('p') always use p = 1 (never clipped). The ratio minimising the
   mean squared error between the quantized model's final output (logits; the last hidden
   state for a headless model) and the floating-point one over the calibration batches
   (padding excluded) wins; one ratio for the whole model.
3. Fine stage (quant.twc_fine): the clipped points' ranges, re-parameterised as LSQ+ scale
   and zero-point (lsq.init_from_range), are trained with Adam (optax), a cosine schedule
   from quant.twc_lr (1e-5) over quant.twc_epochs (3) epochs of the calibration batches, on
   the same output MSE; weights and everything else stay frozen. The learned (scale,
   rounded zero-point) go back into the 'quant' collection as x_min = -z s, x_max =
   (2^b - 1 - z) s, so the returned model is an ordinary frozen quantized model. The fine
   ranges are evaluated after every epoch (frozen, the calibration output MSE); the best
   epoch is kept if it beats the coarse stage, else the coarse ranges stay.
   Learned: asymmetric per-tensor points (the original's setting) except the attention
   probabilities; symmetric activation points keep their coarse ranges.
Statistics are measured on the floating-point model; padding never counts.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from oqt_jax.errors import ConfigError
from oqt_jax.quant.calibrate import calibrate, model_inputs, strip
from oqt_jax.quant.hooks import COLLECTION, QuantHooks, token_mask_for
from oqt_jax.quant.methods import lsq, migration
from oqt_jax.quant.points import split_name, validate_quant_config
from oqt_jax.quant.quantizers import int_grid


def gamma_factors(model, variables, min_gamma: float = 1e-5) -> dict:
  """{LayerNorm path: the factor migrated out of it}: gamma, 1 where |gamma| < min_gamma.

  On an already migrated model (e.g. by SmoothQuant) gamma is the LN's current scale.
  """
  params = variables['params']
  out = {}
  for ln_path, _ in migration.ln_consumers(model.cfg):
    g = np.asarray(migration._get(params, ln_path)['scale'], np.float32)
    out[ln_path] = np.where(np.abs(g) >= min_gamma, g, np.float32(1.0))
  return out


def gamma_migration(model, variables, *, min_gamma: float = 1e-5):
  """(model', variables'): Gamma Migration of a BERT or OPT model (module docstring).

  model: a model from oqt_jax.models.build (floating point or with quant hooks: the hooks are
  kept, the 'quant' collection is dropped: calibrate after migrating). The returned model has
  cfg.gamma_migrated = True; the floating-point output is unchanged.
  """
  if min_gamma <= 0:
    raise ValueError(f'gamma_migration: min_gamma={min_gamma} must be > 0')
  return migration.migrate(model, variables, gamma_factors(model, variables, min_gamma))


# ================================================================================================
# Token-Wise Clipping
# ================================================================================================
STATS = 'twc_stats'       # collection of the token statistics pass
LSQ = 'twc_lsq'           # collection of the fine stage's LSQ+ parameters
RATIO_STEP = 0.01


def candidate_ratios(n_bits_act: int) -> np.ndarray:
  """1, 1 - 0.01, ..., 1 - 0.01 K (K = 10 for >= 8 bits, 30 for 6-7 bits, 90 below)."""
  k = 10 if n_bits_act >= 8 else 30 if n_bits_act >= 6 else 90
  return (1.0 - RATIO_STEP * np.arange(k + 1)).astype(np.float32)


def token_min_max(x, mask=None):
  """(u, l, valid) per token: max / min over the channels of the valid entries.

  x: (B, T, D) (tokens = (B, T)), (B, H, Tq, Tk) (tokens = (B, Tq), channels = H x Tk),
  (B, D) (tokens = rows) or any (..., D); mask: the (B, T) token mask or None.
  """
  xf = jnp.asarray(x, jnp.float32)
  m = token_mask_for(xf, mask)
  m = jnp.ones(xf.shape, bool) if m is None else jnp.broadcast_to(m, xf.shape)
  if xf.ndim == 4:
    xf, m = jnp.moveaxis(xf, 2, 1), jnp.moveaxis(m, 2, 1)      # (B, Tq, H, Tk)
    axes = (2, 3)
  elif xf.ndim <= 1:
    xf, m = xf.reshape(1, -1), m.reshape(1, -1)
    axes = (1,)
  else:
    axes = (xf.ndim - 1,)
  u = jnp.max(jnp.where(m, xf, -jnp.inf), axis=axes)
  l = jnp.min(jnp.where(m, xf, jnp.inf), axis=axes)
  return u, l, jnp.any(m, axis=axes)


def _masked_quantile(v, valid, ratios):
  """quantile(v[valid], ratios) (numpy 'linear'); v, valid 1-d; NaN if nothing is valid."""
  srt = jnp.sort(jnp.where(valid, v, jnp.inf))
  n = jnp.sum(valid)
  last = jnp.maximum(n - 1, 0).astype(jnp.float32)
  pos = jnp.asarray(ratios, jnp.float32) * last
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
  a, b = srt[lo], srt[hi]
  q = a + (b - a) * (pos - lo.astype(jnp.float32))
  return jnp.where(n > 0, q, jnp.nan)


def twc_ratio_ranges(u, l, valid, ratios):
  """One batch's clipped (lower, upper), each (C,), for the ratios (C,): module docstring.

  u, l, valid: per-token max, min and validity (any shape, flattened). A batch without a
  valid token gives NaN (left out of the average over batches).
  """
  u, l, valid = (jnp.ravel(jnp.asarray(a)) for a in (u, l, valid))
  valid = valid.astype(bool)
  big_u = _masked_quantile(jnp.abs(u), valid, ratios)               # (C,)
  big_l = -_masked_quantile(jnp.abs(l), valid, ratios)
  keep_u = valid[None, :] & (u[None, :] <= big_u[:, None])
  keep_l = valid[None, :] & (l[None, :] >= big_l[:, None])
  upper = jnp.max(jnp.where(keep_u, u[None, :], -jnp.inf), axis=1)
  lower = jnp.min(jnp.where(keep_l, l[None, :], jnp.inf), axis=1)
  ok = jnp.any(valid)
  return jnp.where(ok, lower, jnp.nan), jnp.where(ok, upper, jnp.nan)


@dataclasses.dataclass(frozen=True)
class TWCHooks(QuantHooks):
  """QuantHooks with two more modes for Token-Wise Clipping:
    'twc_stats'  floating point; every enabled per-tensor activation point puts its token
                 statistics (u, l, valid) into the 'twc_stats' collection;
    'twc_lsq'    as 'frozen', except that a point with parameters in the 'twc_lsq'
                 collection ({'scale', 'zero_point'}) is quantized with LSQ+ from them.
  """
  def __post_init__(self):
    if self.mode not in ('twc_stats', 'twc_lsq'):
      super().__post_init__()

  def weight(self, module, name, w):
    if self.mode == 'twc_stats':
      return w
    return super().weight(module, name, w)

  def dot_general(self, module, name, mask=None):
    if self.mode == 'twc_stats':
      return None
    return super().dot_general(module, name, mask)

  def act(self, module, name, x, mask):
    if self.mode == 'twc_stats':
      spec = self.rules.spec(name)
      if spec.enabled and spec.granularity == 'per_tensor':
        u, l, valid = token_min_max(x, mask)
        module.put_variable(STATS, name, {'u': u, 'l': l, 'valid': valid})
      return x
    if self.mode == 'twc_lsq' and module.has_variable(LSQ, name):
      p = module.get_variable(LSQ, name)
      return lsq.lsq_plus_quantize(x, p['scale'], p['zero_point'], self.rules.spec(name).n_bits)
    return QuantHooks.act(self.with_mode('frozen'), module, name, x, mask)


def _output(out):
  return out.logits if out.logits is not None else out.last_hidden_state


def _sq_err(q, fp, mask):
  """(sum of squared errors over valid tokens, number of valid values)."""
  d = jnp.square(jnp.asarray(q, jnp.float32) - jnp.asarray(fp, jnp.float32))
  if mask is not None and d.ndim >= 2 and d.shape[:2] == mask.shape:
    m = mask.astype(jnp.float32).reshape(mask.shape + (1,) * (d.ndim - 2))
    return jnp.sum(d * m), jnp.sum(m) * float(np.prod(d.shape[2:]))
  return jnp.sum(d), jnp.float32(d.size)


def _mask(inputs):
  return inputs.get('attention_mask')


def _flat_points(quant_state, rules) -> dict:
  """{point name: path of its state in the 'quant' collection} of the clippable points."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(quant_state))
  out = {}
  for path in flat:
    if path[-1] != 'x_min' or 'fp' in path or len(path) < 2:
      continue
    name = path[-2]
    if name.startswith('in_'):
      continue
    try:
      kind, _, _ = split_name(name)
    except ValueError:
      continue
    spec = rules.spec(name)
    if kind == 'act' and spec.enabled and spec.granularity == 'per_tensor':
      out[name] = path[:-1]
  return out


def _set_ranges(quant_state, paths: dict, lows: dict, highs: dict):
  flat = dict(traverse_util.flatten_dict(flax.core.unfreeze(quant_state)))
  for name, path in paths.items():
    flat[path + ('x_min',)] = jnp.asarray(lows[name], jnp.float32)
    flat[path + ('x_max',)] = jnp.asarray(highs[name], jnp.float32)
  return traverse_util.unflatten_dict(flat)


def _progress(items, on, desc):
  if not on:
    return items
  from tqdm.auto import tqdm
  return tqdm(items, desc=desc, leave=False)


def token_wise_clipping(model, variables, batches: Iterable[Any], qcfg, *,
                        num_batches=None, progress: bool = False, return_info: bool = False):
  """Token-Wise Clipping PTQ (coarse ratio search + optional LSQ+ fine stage).

  Args:
    model, variables: a floating-point model (apply gamma_migration first for the full
      Outlier Suppression) and its variables.
    batches: calibration batches (dicts as for quant.calibrate); the first `num_batches`
      (default qcfg.est_num_batches) are used.
    qcfg: quant config (quant.config(...) / config.quant, or a full config):
      twc_fine, twc_lr, twc_epochs drive the fine stage.
    return_info: also return {'ratio', 'ratios', 'coarse_mse' (per ratio), 'minmax_mse'
      (ratio 1), 'fine_mse' (of the returned ranges), 'fine_history' (per epoch),
      'fine_kept', 'points', 'seconds' (per stage)}.
  Returns:
    (qmodel, qvariables) as quant.calibrate (frozen ranges), [+ info].
  """
  if 'quant' in qcfg:
    qcfg = qcfg.quant
  validate_quant_config(qcfg)
  if qcfg.get('dynamic', False):
    raise ConfigError('quant.dynamic=True: token-wise clipping needs static activation ranges')
  n = int(num_batches or qcfg.get('est_num_batches', 16))
  cal = [model_inputs(model, b) for b in itertools.islice(iter(batches), n)]
  if not cal:
    raise ValueError('token_wise_clipping: no calibration batches')
  clock = [time.perf_counter()]
  seconds = {}

  def lap(name):
    clock.append(time.perf_counter())
    seconds[name] = round(clock[-1] - clock[-2], 3)

  qmodel, qvars = calibrate(model, variables, cal, qcfg, num_batches=len(cal),
                            progress=progress)
  lap('calibrate')
  base = strip(qvars)
  rules = qmodel.quant.rules
  hooks = TWCHooks(rules=rules, mode='frozen', int8_backend=qmodel.quant.int8_backend)
  quant_state = qvars[COLLECTION]
  paths = _flat_points(quant_state, rules)
  ratios = candidate_ratios(rules.n_bits_act)
  fp_model = model.clone(quant=None)

  # ---- coarse stage: per-batch candidate ranges of every point -------------------------------
  stats_model = model.clone(quant=hooks.with_mode('twc_stats'))

  @jax.jit
  def batch_ranges(v, inputs):
    _, st = stats_model.apply(dict(v, **{COLLECTION: quant_state}), **inputs, mutable=[STATS])
    flat = traverse_util.flatten_dict(flax.core.unfreeze(st[STATS]))
    per = {}
    for path, leaf in flat.items():
      per.setdefault(path[-2], {})[path[-1]] = leaf
    return {name: twc_ratio_ranges(s['u'], s['l'], s['valid'], ratios)
            for name, s in per.items() if name in paths}

  acc = {}
  for b in _progress(cal, progress, 'TWC statistics'):
    for name, (lo, hi) in batch_ranges(base, b).items():
      acc.setdefault(name, []).append((np.asarray(lo), np.asarray(hi)))
  lows, highs = {}, {}
  for name, items in acc.items():
    lo = np.nanmean(np.stack([a for a, _ in items]), axis=0)      # (C,)
    hi = np.nanmean(np.stack([b for _, b in items]), axis=0)
    if split_name(name)[1] == 'p':           # attention probabilities are never clipped
      lo, hi = np.full_like(lo, lo[0]), np.full_like(hi, hi[0])
    lows[name], highs[name] = np.nan_to_num(lo), np.nan_to_num(hi)
  paths = {k: p for k, p in paths.items() if k in lows}
  lap('statistics')

  q_frozen = model.clone(quant=hooks.with_mode('frozen'))
  lsq_model = model.clone(quant=hooks.with_mode('twc_lsq'))

  def batch_err(q_out, v, inputs):
    fp = _output(fp_model.apply(v, **inputs))
    return _sq_err(_output(q_out), fp, _mask(inputs))

  @jax.jit
  def candidate_err(v, qstate, lo_tab, hi_tab, c, inputs):
    st = _set_ranges(qstate, paths, {k: lo_tab[k][c] for k in paths},
                     {k: hi_tab[k][c] for k in paths})
    return batch_err(q_frozen.apply(dict(v, **{COLLECTION: st}), **inputs), v, inputs)

  def mse_of(fn, *args):
    tot, cnt = 0.0, 0.0
    for b in cal:
      s, k = fn(*args, b)
      tot, cnt = tot + float(s), cnt + float(k)
    return tot / max(cnt, 1.0)

  lo_tab = {k: jnp.asarray(v) for k, v in lows.items()}
  hi_tab = {k: jnp.asarray(v) for k, v in highs.items()}
  coarse = [mse_of(candidate_err, base, quant_state, lo_tab, hi_tab, jnp.int32(c))
            for c in _progress(range(len(ratios)), progress, 'TWC ratio search')]
  best = int(np.argmin(coarse))
  quant_state = _set_ranges(quant_state, paths, {k: v[best] for k, v in lows.items()},
                            {k: v[best] for k, v in highs.items()})
  lap('ratio_search')
  info = dict(ratio=float(ratios[best]), ratios=ratios.tolist(), coarse_mse=coarse,
              minmax_mse=coarse[0], points=sorted(paths), fine_mse=None, fine_kept=False)

  # ---- fine stage: LSQ+ on the clipped asymmetric points ----------------------------------
  if qcfg.get('twc_fine', True):
    learn = {k: p for k, p in paths.items()
             if not rules.spec(k).symmetric and split_name(k)[1] != 'p'}
    if learn:
      quant_state, history, kept = _fine_stage(
          lsq_model, q_frozen, base, quant_state, learn, rules, cal, coarse[best],
          lr=float(qcfg.get('twc_lr', 1e-5)), epochs=int(qcfg.get('twc_epochs', 3)),
          progress=progress, batch_err=batch_err, mse_of=mse_of)
      info.update(fine_mse=min(history + [coarse[best]]), fine_history=history,
                  fine_kept=kept)
    lap('fine_stage')
  info['seconds'] = seconds
  qvars = dict(qvars, **{COLLECTION: quant_state})
  return (qmodel, qvars, info) if return_info else (qmodel, qvars)


def _fine_stage(lsq_model, q_frozen, base, quant_state, learn, rules, cal, coarse_mse,
                *, lr, epochs, progress, batch_err, mse_of):
  """LSQ+ on `learn` points; returns (quant_state, MSE after each epoch, kept): the state of
  the epoch with the lowest calibration MSE if below coarse_mse, else the coarse state."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(quant_state))
  params = {}
  for name, path in learn.items():
    s, z = lsq.init_from_range(flat[path + ('x_min',)], flat[path + ('x_max',)],
                               rules.spec(name).n_bits, symmetric=False)
    params[path] = {'scale': s, 'zero_point': z}
  params = traverse_util.unflatten_dict(params)   # the 'twc_lsq' collection, same layout
  total = max(epochs * len(cal), 1)
  opt = optax.adam(optax.cosine_decay_schedule(lr, total))
  opt_state = opt.init(params)

  def loss_fn(p, v, inputs):
    out = lsq_model.apply(dict(v, **{COLLECTION: quant_state, LSQ: p}), **inputs)
    s, k = batch_err(out, v, inputs)
    return s / jnp.maximum(k, 1.0)

  @jax.jit
  def step(p, o, v, inputs):
    loss, g = jax.value_and_grad(loss_fn)(p, v, inputs)
    upd, o = opt.update(g, o, p)
    return optax.apply_updates(p, upd), o, loss

  def to_state(p):
    flat_p = traverse_util.flatten_dict(p)
    new = dict(flat)
    for name, path in learn.items():
      _, q_max = int_grid(rules.spec(name).n_bits, False)
      s = jnp.maximum(jnp.asarray(flat_p[path + ('scale',)], jnp.float32), 1e-8)
      z = jnp.clip(jnp.round(flat_p[path + ('zero_point',)]), 0.0, q_max)
      new[path + ('x_min',)] = -z * s
      new[path + ('x_max',)] = (q_max - z) * s
    return traverse_util.unflatten_dict(new)

  @jax.jit
  def frozen_err(v, st, inputs):
    return batch_err(q_frozen.apply(dict(v, **{COLLECTION: st}), **inputs), v, inputs)

  best_state, best_mse, history = quant_state, coarse_mse, []
  bar = _progress(range(epochs), progress, 'TWC fine stage (LSQ+)')
  for _ in bar:
    for b in cal:
      params, opt_state, _ = step(params, opt_state, base, b)
    state = to_state(params)
    history.append(mse_of(frozen_err, base, state))
    if history[-1] < best_mse:
      best_state, best_mse = state, history[-1]
  return best_state, history, best_state is not quant_state
