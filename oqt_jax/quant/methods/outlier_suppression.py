"""Outlier Suppression (Wei et al., NeurIPS 2022): Gamma Migration and Token-Wise Clipping.

  qmodel, qvariables = outlier_suppression_method(model, variables, batches, quant.config(**PRESET))
  model, variables = quant.gamma_migration(model, variables)
  qmodel, qvariables = quant.token_wise_clipping(model, variables, batches, qcfg)

The original's setting (wimh966/outlier_suppression, exp/bert_ptq/twc_fine_gamma configs) is
PRESET: W6A6, activations 6-bit asymmetric per tensor, weights 6-bit symmetric per output
channel with MinMax ranges, only the matmul inputs quantized (quant_setup='matmul_inputs':
the LayerNorm outputs feeding Q/K/V and the FFN, Q, K, V, the attention probabilities, the
context, the GELU output, the pooler output, every Linear weight and the embedding tables;
residual sums, Linear outputs, scores, logits and LN gammas stay floating point), 256
calibration samples (CALIB_SAMPLES). PRESET_W8A8: the same at 8 bits. The original's symmetric
quantizer uses s = absmax / ((q_max - q_min) / 2) (6 bits: absmax / 31.5, 8 bits: / 127.5) on
the signed grid, where oqt_jax's uniform quantizer divides by q_max (31, 127):
outlier_suppression_method stores the original's scale with each weight quantizer
(`original_weight_scales`; the frozen hooks then quantize w as clamp(round(w / s)) s).

Gamma Migration
---------------
Each LayerNorm y = gamma * norm(x) + beta that feeds the next Linear layers keeps only
norm(x) + beta / gamma; gamma moves into those Linears' input rows (W[j, :] *= gamma_j) and
onto the residual branch that reads the same output: the residual add becomes
y' * gamma + sublayer(y'). The LN's output quantizer then sees the gamma-free tensor. The
floating-point function is unchanged (to float32 rounding). Which LayerNorms migrate:
migration.ln_consumers (BERT: the embedding LN -> Q/K/V of layer 0, each attention LN -> its
FFN1, each output LN but the last -> Q/K/V of the next layer; the last layer's output LN keeps
its gamma, as the original). The split LayerNorm keeps the model's eps (BERT 1e-12); the
original's split LN was a fresh nn.LayerNorm with PyTorch's default eps 1e-5, so its migration
changed its own FP output slightly (a bug there, not reproduced).
Guard: a dim with |gamma_j| < min_gamma (default 1e-5) is not migrated (f_j = 1: that dim
keeps its gamma in the LN), so beta / gamma never blows up; the original divided blindly.

Token-Wise Clipping (`token_wise_clipping`)
-------------------------------------------
1. Plain calibration (quant.calibrate) creates every point's state: weight ranges, and the
   ranges of any point TWC does not handle (granularities other than per tensor).
2. Coarse stage, weight fake-quant OFF (weights floating point, as the original's
   disable_all before find_ratio). Candidate ratios p_i = 1 - step * i, i = 0..iters-1, with
   step = min(0.01, 40.96 / (B x T)) (128 * 32 * 0.01 / batch / seq, rounded to two
   significant digits) and iters = int({8: 0.1, 6: 0.3, 4: 0.9}[bits] / step) (other bit
   widths: the entry of the next lower listed width, 8 above 8): 8-bit 10 candidates down to
   0.91, 6-bit 30 down to 0.71, 4-bit 90 down to 0.11 at step 0.01. One floating-point pass
   records, for every enabled per-tensor activation point, each valid token's max u_t and min
   l_t over its channels (Q / K / V / context (B, T, D): the token's D values; probabilities
   (B, H, Tq, Tk): the query token, channels heads x valid keys). Per batch and ratio p:
     U = quantile(|u|, p), L = -quantile(|l|, p)   (torch.quantile 'linear', in float32)
     upper = max{u_t : u_t <= U},  lower = min{l_t : l_t >= L}
   and the point's range is the mean of lower / upper over the batches (`twc_ratio_ranges`).
   Never clipped (ratio 1: the batch min / max, averaged): the attention probabilities, and
   points without a token axis ((B, D): the pooler output; a classifier's pooler input, see
   below), which the original observes without a token mask. The ratio minimising the sum
   over the calibration batches of each batch's mean squared error between the model's final
   output (logits; the last hidden state for a headless model; valid tokens only where the
   output is per token) and the floating-point one wins (ties: the larger ratio); one ratio
   for the whole model.
3. Fine stage (quant.twc_fine), weight fake-quant still OFF: every clipped or unclipped
   asymmetric per-tensor activation quantizer, the probabilities included, becomes LSQ+
   (learned scale s and float zero-point z, initialised from the coarse range as the
   original's observer: s = (max(x_max, 0) - min(x_min, 0)) / q_max, z = round(-min(x_min, 0)
   / s) clamped to the grid; gradient scale 1 / sqrt(numel * q_max)), trained with Adam
   (lr quant.twc_lr = 1e-5, betas (0.9, 0.999), eps 1e-8), a cosine schedule to 0 over all
   steps, quant.twc_epochs = 3 epochs over the calibration batches, one step per batch, loss
   the batch's output MSE against floating point. After every step the parameters are
   projected as the original's LSQ+ quantizer does at each forward: s := max(|s|, float32
   eps), z := clamp(z, 0, q_max). The LAST epoch's parameters are kept (fine_keep='last', as
   the original); fine_keep='best' keeps the epoch with the lowest calibration MSE (or the
   coarse ranges if none beats them). The learned (s, z) are stored in the 'quant'
   collection in the LSQ form the frozen hooks read ({'scale', 'zero_point', 'q_min',
   'q_max'}: z rounded with the STE in the forward pass, exactly the original's forward), with
   the equivalent x_min = -round(z) s, x_max = (q_max - round(z)) s beside them for inspection.
   Symmetric activation quantizers (not the original's setting) keep their coarse ranges.
4. The returned model quantizes weights and activations (frozen QuantHooks).

Padding. The original removes padding from the statistics by keeping the first sum(mask)
tokens of each row (right padding assumed; its GLUE inputs are padded to max_seq_length) and
fake-quantizes every position; the batch x seq of its step is that padded shape. Here the
attention mask selects the valid tokens wherever they are (left padding too), the padded shape
gives the step, and every position is quantized. Two consequences, both deliberate: a query's
probability channels leave out the keys of padding tokens (the original keeps their ~0
probabilities; no effect on the range, which always contains 0), and the output MSE of a
per-token output (MLM logits, last hidden state) counts valid tokens only (the original's
squad / summarisation branches do the same; its GLUE loss is on per-sequence logits).
BERT classifier: the original quantizes the pooler's input, token 0 of the last layer's
output, with a quantizer of its own (its range from token 0 alone, observed without a mask,
never clipped; LSQ+ gradient scale from B x D elements) and leaves the rest of that output in
floating point. Here that output is the point z(L-1) (points.py, matmul_inputs); for a BERT
with the classification head TWC observes, never clips and scales it exactly so (token 0
only), and since only token 0 feeds the head, the logits are the original's. Other heads: z(L-1)
covers every token and is clipped like the other points.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
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
from oqt_jax.quant import lsq
from oqt_jax.quant.hooks import QuantHooks
from oqt_jax.quant.layout import COLLECTION, token_mask_for
from oqt_jax.quant.methods import migration
from oqt_jax.quant.points import assemble, resolved, split_name
from oqt_jax.quant.quantizers import int_grid

# The original's W6A6 (exp/bert_ptq/twc_fine_gamma/*/config.yaml: a_qconfig LSQPlusFakeQuantize
# + AvgPruneMinMaxObserver, 6 bits, asymmetric, per tensor; w_qconfig MinMaxObserver, 6 bits,
# symmetric, per channel; calibrate: 256; ln.delay: Gamma Migration; learn: lr 1e-5, 3 epochs).
PRESET: dict = dict(
    n_bits=6, n_bits_act=6, qmethod='symmetric_uniform', qmethod_acts='asymmetric_uniform',
    per_channel=True, ranges_weights='current_minmax', act_granularity='per_tensor',
    quant_setup='matmul_inputs', symmetric_signed=True, quant_dict='', dynamic=False, int8=False,
    twc_fine=True, twc_lr=1e-5, twc_epochs=3)
PRESET_W8A8: dict = dict(PRESET, n_bits=8, n_bits_act=8)
CALIB_SAMPLES = 256


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
  cfg.gamma_migrated = True; the floating-point output is unchanged; LN eps stays the model's.
  """
  if min_gamma <= 0:
    raise ValueError(f'gamma_migration: min_gamma={min_gamma} must be > 0')
  return migration.migrate(model, variables, gamma_factors(model, variables, min_gamma))


# ================================================================================================
# Token-Wise Clipping
# ================================================================================================
STATS = 'twc_stats'       # collection of the token statistics pass
LSQ = 'twc_lsq'           # collection of the fine stage's LSQ+ parameters
ITER_SPAN = {8: 0.1, 6: 0.3, 4: 0.9}   # the span of ratios searched per activation bit width
LSQ_EPS = float(np.finfo(np.float32).eps)   # the LSQ+ scale floor (the original's eps buffer)


def twc_step_iters(n_bits_act: int, batch_size: int = 32, seq_len: int = 128):
  """(step, iters) of the coarse search: step = min(0.01, 40.96 / (batch x seq)) rounded to two
  significant digits, iters = int(span / step), span {8: 0.1, 6: 0.3, 4: 0.9} by bit width
  (other widths: the next lower listed one; above 8: 8's)."""
  step = 128 * 32 * 0.01 / int(batch_size) / int(seq_len)
  step = min(float(format(step, '.2g')), 0.01)
  bits = int(n_bits_act)
  key = 8 if bits >= 8 else 6 if bits >= 6 else 4
  return step, int(ITER_SPAN[key] / step)


def candidate_ratios(n_bits_act: int, batch_size: int = 32, seq_len: int = 128, *,
                     step=None, iters=None) -> np.ndarray:
  """The coarse search's ratios 1 - step * i, i = 0..iters-1 (float32; twc_step_iters)."""
  s, n = twc_step_iters(n_bits_act, batch_size, seq_len)
  s = float(step) if step is not None else s
  n = int(iters) if iters is not None else n
  if not s > 0 or n < 1 or 1.0 - s * (n - 1) < 0:
    raise ValueError(f'token_wise_clipping: step={s}, iters={n} give ratios outside [0, 1]')
  return (1.0 - s * np.arange(n, dtype=np.float64)).astype(np.float32)


def token_min_max(x, mask=None):
  """(u, l, valid) per token: max / min over the channels of the valid entries.

  x: (B, T, D) (tokens = (B, T)), (B, H, T, T) (tokens = (B, Tq), channels = H x valid keys),
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


def _lerp(a, b, w):
  """torch.lerp / numpy's quantile interpolation: a + w (b - a) below w = 0.5, else
  b - (1 - w) (b - a)."""
  d = b - a
  return jnp.where(w < 0.5, a + w * d, b - (1.0 - w) * d)


def _masked_quantile(v, valid, ratios):
  """torch.quantile(v[valid], ratios) ('linear', float32); v, valid 1-d; NaN if none valid."""
  srt = jnp.sort(jnp.where(valid, v, jnp.inf))
  n = jnp.sum(valid)
  last = jnp.maximum(n - 1, 0).astype(jnp.float32)
  pos = jnp.asarray(ratios, jnp.float32) * last
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(jnp.ceil(pos).astype(jnp.int32), jnp.maximum(n - 1, 0))
  q = _lerp(srt[lo], srt[hi], pos - lo.astype(jnp.float32))
  return jnp.where(n > 0, q, jnp.nan)


def twc_ratio_ranges(u, l, valid, ratios):
  """One batch's clipped (lower, upper), each (C,), for the ratios (C,): module docstring.

  u, l, valid: per-token max, min and validity (any shape, flattened). A batch without a
  valid token gives NaN (left out of the average over batches).
  """
  u, l, valid = (jnp.ravel(jnp.asarray(a)) for a in (u, l, valid))
  u, l = u.astype(jnp.float32), l.astype(jnp.float32)
  valid = valid.astype(bool)
  big_u = _masked_quantile(jnp.abs(u), valid, ratios)               # (C,)
  big_l = -_masked_quantile(jnp.abs(l), valid, ratios)
  keep_u = valid[None, :] & (u[None, :] <= big_u[:, None])
  keep_l = valid[None, :] & (l[None, :] >= big_l[:, None])
  upper = jnp.max(jnp.where(keep_u, u[None, :], -jnp.inf), axis=1)
  lower = jnp.min(jnp.where(keep_l, l[None, :], jnp.inf), axis=1)
  ok = jnp.any(valid)
  return jnp.where(ok, lower, jnp.nan), jnp.where(ok, upper, jnp.nan)


def lsq_plus_init(x_min, x_max, n_bits: int):
  """(scale, zero_point) of LSQ+ from a range, as the original's observer (calculate_qparams):
  s = max((max(x_max, 0) - min(x_min, 0)) / q_max, 1e-8), z = clamp(round(-min(x_min, 0) / s),
  0, q_max) (an integer-valued float)."""
  _, q_max = int_grid(n_bits, False)
  lo = np.minimum(np.float32(x_min), np.float32(0))
  hi = np.maximum(np.float32(x_max), np.float32(0))
  s = np.maximum((hi - lo) / np.float32(q_max), np.float32(1e-8)).astype(np.float32)
  z = np.clip(np.round(-lo / s), 0, q_max).astype(np.float32)
  return s, z


def lsq_plus_project(scale, zero_point, q_max):
  """The original's LSQ+ parameter projection (each forward): s := max(|s|, float32 eps),
  z := clamp(z, 0, q_max)."""
  return jnp.maximum(jnp.abs(scale), LSQ_EPS), jnp.clip(zero_point, 0.0, q_max)


def original_weight_scales(quant_state, rules):
  """The symmetric weight quantizers' states with the original's scale: each gets
  {'scale': max(absmax / ((q_max - q_min) / 2), 1e-8), 'zero_point': 0, 'q_min', 'q_max'} on
  the signed grid (6 bits: absmax / 31.5 on [-32, 31]), absmax from its calibrated x_min /
  x_max (kept beside for inspection). The frozen hooks quantize a state with 'scale' as
  (clamp(round(w / s), q_min, q_max)) s: the original's fake quantization to the bit.
  Other points are unchanged."""
  flat = dict(traverse_util.flatten_dict(flax.core.unfreeze(quant_state)))
  for path in list(flat):
    if path[-1] != 'x_min' or len(path) < 2 or path[-2].startswith('in_'):
      continue
    try:
      kind, _, _ = split_name(path[-2])
    except ValueError:
      continue
    spec = rules.spec(path[-2])
    if kind != 'weight' or not spec.enabled or not spec.symmetric:
      continue
    p = path[:-1]
    lo = np.minimum(np.asarray(flat[p + ('x_min',)], np.float32), np.float32(0))
    hi = np.maximum(np.asarray(flat[p + ('x_max',)], np.float32), np.float32(0))
    q_min, q_max = int_grid(spec.n_bits, True, True)
    absmax = np.maximum(-lo, hi).astype(np.float32)
    scale = np.maximum(absmax / np.float32((q_max - q_min) / 2), np.float32(1e-8))
    flat[p + ('scale',)] = jnp.asarray(scale, jnp.float32)
    flat[p + ('zero_point',)] = jnp.zeros_like(jnp.asarray(scale, jnp.float32))
    flat[p + ('q_min',)] = jnp.float32(q_min)
    flat[p + ('q_max',)] = jnp.float32(q_max)
  return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass(frozen=True)
class TWCHooks(QuantHooks):
  """QuantHooks with the two modes of Token-Wise Clipping, both with weights in floating point
  (weight fake-quant off, as the original during the search and the fine stage):
    'twc_stats'  floating point; every enabled per-tensor activation point puts its token
                 statistics (u, l, valid) into the 'twc_stats' collection;
    'twc_acts'   activations as 'frozen', except that a point with parameters in the
                 'twc_lsq' collection ({'scale', 'zero_point'}) is quantized with LSQ+ from
                 them (the original's LSQPlusFakeQuantize forward).
  """
  pooler_input: str = ''   # BERT classifier: the last layer's output LN point (z(L-1))

  def __post_init__(self):
    if self.mode not in ('twc_stats', 'twc_acts'):
      super().__post_init__()

  def weight(self, module, name, w):
    if self.mode in ('twc_stats', 'twc_acts'):
      return w
    return super().weight(module, name, w)

  def dot_general(self, module, name, mask=None):
    if self.mode in ('twc_stats', 'twc_acts'):
      return None
    return super().dot_general(module, name, mask)

  def act(self, module, name, x, mask):
    if self.mode == 'twc_stats':
      spec = self.rules.spec(name)
      if spec.enabled and spec.granularity == 'per_tensor':
        obs, m = (x[:, 0], None) if name == self.pooler_input else (x, mask)
        u, l, valid = token_min_max(obs, m)     # pooler input: token 0 alone feeds the head
        module.put_variable(STATS, name, {'u': u, 'l': l, 'valid': valid})
      return x
    if self.mode == 'twc_acts':
      if module.has_variable(LSQ, name):
        p = module.get_variable(LSQ, name)
        _, q_max = int_grid(self.rules.spec(name).n_bits, False)
        g = lsq.grad_factor(x[:, 0] if name == self.pooler_input else x, q_max)
        return lsq.lsq_affine_quantize(x, p['scale'], p['zero_point'], 0.0, q_max, g)
      return QuantHooks.act(self.with_mode('frozen'), module, name, x, mask)
    return super().act(module, name, x, mask)


def _output(out):
  return out.logits if out.logits is not None else out.last_hidden_state


def _batch_mse(q, fp, mask):
  """Mean squared error of one batch (valid tokens only where the output is per token)."""
  d = jnp.square(jnp.asarray(q, jnp.float32) - jnp.asarray(fp, jnp.float32))
  if mask is not None and d.ndim >= 2 and d.shape[:2] == mask.shape:
    m = mask.astype(jnp.float32).reshape(mask.shape + (1,) * (d.ndim - 2))
    cnt = jnp.sum(m) * float(np.prod(d.shape[2:]))
    return jnp.sum(d * m) / jnp.maximum(cnt, 1.0)
  return jnp.mean(d)


def _flat_points(quant_state, rules) -> dict:
  """{point name: path of its state in the 'quant' collection} of the per-tensor act points."""
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


FINE_KEEP = ('last', 'best')


def _batch_err(acts_model, fp_model, v, qstate, lsq_params, inputs):
  """The batch output MSE of the activation-quantized model (weights FP) against FP."""
  extra = {COLLECTION: qstate}
  if lsq_params is not None:
    extra[LSQ] = lsq_params
  out = _output(acts_model.apply(dict(v, **extra), **inputs))
  fp = _output(fp_model.apply(v, **inputs))
  return _batch_mse(out, fp, inputs.get('attention_mask'))


@functools.lru_cache(maxsize=16)
def _stats_fn(stats_model, names: tuple):
  """jit(v, quant_state, inputs, ratios) -> {point: (lower (C,), upper (C,), never clipped)}."""
  def f(v, qstate, inputs, ratios):
    _, st = stats_model.apply(dict(v, **{COLLECTION: qstate}), **inputs, mutable=[STATS])
    flat = traverse_util.flatten_dict(flax.core.unfreeze(st[STATS]))
    per = {}
    for path, leaf in flat.items():
      per.setdefault(path[-2], {})[path[-1]] = leaf
    out = {}
    for name, s in per.items():
      if name not in names:
        continue
      # Never clipped: the probabilities, and tensors without a token axis ((B, D)).
      fixed = split_name(name)[1] == 'p' or s['u'].ndim < 2
      r = jnp.ones_like(ratios) if fixed else ratios
      out[name] = twc_ratio_ranges(s['u'], s['l'], s['valid'], r) + (jnp.asarray(fixed),)
    return out
  return jax.jit(f)


@functools.lru_cache(maxsize=16)
def _candidate_fn(acts_model, fp_model, path_items: tuple):
  """jit(v, quant_state, lows, highs, c, inputs) -> batch MSE with candidate c's ranges."""
  paths = dict(path_items)

  def f(v, qstate, lo_tab, hi_tab, c, inputs):
    st = _set_ranges(qstate, paths, {k: lo_tab[k][c] for k in paths},
                     {k: hi_tab[k][c] for k in paths})
    return _batch_err(acts_model, fp_model, v, st, None, inputs)
  return jax.jit(f)


@functools.lru_cache(maxsize=16)
def _fine_fns(acts_model, fp_model):
  """(step, err): jit Adam + projection step of the LSQ+ parameters, and their batch MSE."""
  adam = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)

  def loss(p, v, qstate, inputs):
    return _batch_err(acts_model, fp_model, v, qstate, p, inputs)

  def step(p, o, v, qstate, inputs, lr, q_max_tree):
    g = jax.grad(loss)(p, v, qstate, inputs)
    upd, o = adam.update(g, o, p)
    p = jax.tree_util.tree_map(lambda a, u: a - lr * u, p, upd)
    p = jax.tree_util.tree_map(
        lambda leaf, qm: dict(zip(('scale', 'zero_point'),
                                  lsq_plus_project(leaf['scale'], leaf['zero_point'], qm))),
        p, q_max_tree, is_leaf=lambda t: isinstance(t, dict) and 'scale' in t)
    return p, o
  return jax.jit(step), jax.jit(loss), adam


def cosine_lr(lr: float, k: int, total: int) -> float:
  """The learning rate of update k (0-based) of `total`: lr (1 + cos(pi k / total)) / 2
  (torch CosineAnnealingLR with T_max = total, eta_min = 0, stepped after every update)."""
  return 0.5 * float(lr) * (1.0 + math.cos(math.pi * k / max(total, 1)))


def token_wise_clipping(model, variables, batches: Iterable[Any], qcfg, *,
                        num_batches=None, progress: bool = False, return_info: bool = False,
                        fine_keep: str = 'last', step=None, iters=None):
  """Token-Wise Clipping PTQ (coarse ratio search + LSQ+ fine stage; module docstring).

  Args:
    model, variables: a floating-point model (apply gamma_migration first for the full
      Outlier Suppression) and its variables.
    batches: calibration batches (dicts as for quant.calibrate); the first `num_batches`
      (default qcfg.est_num_batches) are used; the first one's (batch, seq) shape sets the
      ratio step.
    qcfg: quant config (quant.config(...) / config.quant, or a full config):
      twc_fine, twc_lr, twc_epochs drive the fine stage.
    fine_keep: 'last' (the original) or 'best' (the epoch with the lowest calibration MSE, or
      the coarse ranges if no epoch beats them).
    step, iters: override the coarse grid (the original's quant.step / quant.iters).
    return_info: also return {'ratio', 'ratios', 'step', 'iters', 'coarse_mse' (per ratio: the
      mean over batches of the batch output MSE, weights FP), 'minmax_mse' (ratio 1),
      'fine_mse' (of the returned activation ranges, weights FP), 'fine_history' (per epoch,
      with fine_keep='best'), 'fine_kept', 'points' (searched), 'clipped' (ratio < 1 applies),
      'coarse_ranges' ({point: (x_min, x_max)} at the chosen ratio),
      'learned' (fine stage), 'seconds' (per stage)}.
  Returns:
    (qmodel, qvariables) as quant.calibrate (frozen ranges), [+ info].
  """
  qcfg = resolved(qcfg)
  if qcfg.get('dynamic', False):
    raise ConfigError('quant.dynamic=True: token-wise clipping needs static activation ranges')
  if fine_keep not in FINE_KEEP:
    raise ValueError(f'token_wise_clipping: fine_keep={fine_keep!r}; expected one of {FINE_KEEP}')
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
  cfg = model.cfg
  pooler_input = (f'z{cfg.num_layers - 1}' if cfg.model_type == 'bert'
                  and cfg.resolved_head == 'cls' and cfg.num_layers else '')
  hooks = TWCHooks(rules=rules, mode='twc_acts', int8_backend=qmodel.quant.int8_backend,
                   pooler_input=pooler_input)
  quant_state = qvars[COLLECTION]
  paths = _flat_points(quant_state, rules)
  bsz, seq = (int(d) for d in cal[0]['input_ids'].shape[:2])
  ratios = candidate_ratios(rules.n_bits_act, bsz, seq, step=step, iters=iters)
  step_used = float(step) if step is not None else twc_step_iters(rules.n_bits_act, bsz, seq)[0]
  fp_model = model.clone(quant=None)
  acts_model = model.clone(quant=hooks)

  # ---- coarse stage: per-batch candidate ranges of every point (FP statistics) ---------------
  stats = _stats_fn(model.clone(quant=hooks.with_mode('twc_stats')), tuple(sorted(paths)))
  acc, fixed = {}, {}
  for b in _progress(cal, progress, 'TWC statistics'):
    for name, (lo, hi, fx) in stats(base, quant_state, b, jnp.asarray(ratios)).items():
      acc.setdefault(name, []).append((np.asarray(lo), np.asarray(hi)))
      fixed[name] = bool(fx)
  lows, highs = {}, {}
  for name, items in acc.items():
    # the original's running mean over batches (AvgPruneMinMaxObserver)
    lo = np.nanmean(np.stack([a for a, _ in items]), axis=0).astype(np.float32)
    hi = np.nanmean(np.stack([b for _, b in items]), axis=0).astype(np.float32)
    lows[name], highs[name] = np.nan_to_num(lo), np.nan_to_num(hi)
  paths = {k: p for k, p in paths.items() if k in lows}
  lap('statistics')

  def mean_err(fn, *args):
    return float(np.mean([float(fn(*args, b)) for b in cal]))

  cand = _candidate_fn(acts_model, fp_model, tuple(sorted(paths.items())))
  lo_tab = {k: jnp.asarray(v) for k, v in lows.items()}
  hi_tab = {k: jnp.asarray(v) for k, v in highs.items()}
  coarse = [mean_err(cand, base, quant_state, lo_tab, hi_tab, jnp.int32(c))
            for c in _progress(range(len(ratios)), progress, 'TWC ratio search')]
  best = int(np.argmin(coarse))          # first minimum: ties keep the larger ratio
  quant_state = _set_ranges(quant_state, paths, {k: v[best] for k, v in lows.items()},
                            {k: v[best] for k, v in highs.items()})
  lap('ratio_search')
  info = dict(ratio=float(ratios[best]), ratios=ratios.tolist(), step=step_used,
              iters=len(ratios), coarse_mse=coarse, minmax_mse=coarse[0], points=sorted(paths),
              clipped=sorted(k for k in paths if not fixed[k]), learned=[],
              coarse_ranges={k: (float(lows[k][best]), float(highs[k][best])) for k in paths},
              fine_mse=coarse[best], fine_history=[], fine_kept=False)

  # ---- fine stage: LSQ+ on every asymmetric per-tensor activation quantizer ------------------
  if qcfg.get('twc_fine', True):
    learn = {k: p for k, p in paths.items() if not rules.spec(k).symmetric}
    if learn:
      quant_state, fine_mse, history, kept = _fine_stage(
          acts_model, fp_model, base, quant_state, learn, rules, cal, coarse[best],
          lr=float(qcfg.get('twc_lr', 1e-5)), epochs=int(qcfg.get('twc_epochs', 3)),
          keep=fine_keep, progress=progress, mean_err=mean_err)
      info.update(learned=sorted(learn), fine_mse=fine_mse, fine_history=history,
                  fine_kept=kept)
    lap('fine_stage')
  info['seconds'] = seconds
  qvars = dict(qvars, **{COLLECTION: quant_state})
  return (qmodel, qvars, info) if return_info else (qmodel, qvars)


def _fine_stage(acts_model, fp_model, base, quant_state, learn, rules, cal, coarse_mse, *, lr,
                epochs, keep, progress, mean_err):
  """LSQ+ on the `learn` points (module docstring, step 3). Returns (quant_state, its MSE with
  weights FP, per-epoch MSE (keep='best'), whether learned parameters were kept)."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(quant_state))
  q_maxes = {name: int_grid(rules.spec(name).n_bits, False)[1] for name in learn}
  params = {}
  for name, path in learn.items():
    s, z = lsq_plus_init(flat[path + ('x_min',)], flat[path + ('x_max',)],
                         rules.spec(name).n_bits)
    params[path] = {'scale': jnp.asarray(s), 'zero_point': jnp.asarray(z)}
  q_max_tree = traverse_util.unflatten_dict(
      {path: jnp.float32(q_maxes[name]) for name, path in learn.items()})
  params = traverse_util.unflatten_dict(params)   # the 'twc_lsq' collection, same layout
  step_fn, err_fn, adam = _fine_fns(acts_model, fp_model)
  opt_state = adam.init(params)
  total, k = max(epochs * len(cal), 1), 0

  def to_state(p):
    flat_p = traverse_util.flatten_dict(p)
    new = dict(flat)
    for name, path in learn.items():
      q_max = q_maxes[name]
      s = jnp.asarray(flat_p[path + ('scale',)], jnp.float32)
      z = jnp.asarray(flat_p[path + ('zero_point',)], jnp.float32)
      zr = jnp.clip(jnp.round(z), 0.0, q_max)
      new[path + ('scale',)] = s
      new[path + ('zero_point',)] = z
      new[path + ('q_min',)] = jnp.float32(0.0)
      new[path + ('q_max',)] = jnp.float32(q_max)
      new[path + ('x_min',)] = -zr * s
      new[path + ('x_max',)] = (q_max - zr) * s
    return traverse_util.unflatten_dict(new)

  best_p, best_mse, history = None, coarse_mse, []
  for _ in _progress(range(epochs), progress, 'TWC fine stage (LSQ+)'):
    for b in cal:
      params, opt_state = step_fn(params, opt_state, base, quant_state, b,
                                  jnp.float32(cosine_lr(lr, k, total)), q_max_tree)
      k += 1
    if keep == 'best':
      history.append(mean_err(err_fn, params, base, quant_state))
      if history[-1] < best_mse:
        best_p, best_mse = params, history[-1]
  if keep == 'last':
    return to_state(params), mean_err(err_fn, params, base, quant_state), history, True
  if best_p is None:
    return quant_state, coarse_mse, history, False
  return to_state(best_p), best_mse, history, True


def outlier_suppression_method(model, variables, batches: Iterable[Any], qcfg=None,
                               progress: bool = False, *, fine_keep: str = 'last',
                               original_weight_scale: bool = True, return_info: bool = False):
  """Outlier Suppression as the original: Gamma Migration, then Token-Wise Clipping (fine
  stage per qcfg.twc_fine), then the weight ranges with the original's symmetric scale
  (absmax / ((q_max - q_min) / 2), `original_weight_scales`; original_weight_scale=False
  keeps oqt_jax's absmax / q_max). qcfg None: quant.config(**PRESET).
  Returns (qmodel, qvariables) [+ the TWC info]."""
  qcfg = resolved(assemble(**PRESET) if qcfg is None else qcfg)
  model, variables = gamma_migration(model, variables)
  qmodel, qvars, info = token_wise_clipping(model, variables, batches, qcfg, progress=progress,
                                            return_info=True, fine_keep=fine_keep)
  if original_weight_scale:
    qvars = dict(qvars, **{COLLECTION: original_weight_scales(qvars[COLLECTION],
                                                              qmodel.quant.rules)})
  return (qmodel, qvars, info) if return_info else (qmodel, qvars)
