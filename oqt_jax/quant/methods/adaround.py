"""AdaRound (Nagel et al., 2020): learned rounding of the weights, layer by layer.

  qmodel, qvariables = quant.adaround(model, variables, batches, qcfg)

For every Dense layer whose weight is quantized, in forward order:
  - range: the weight's range from the MSE grid (quant.num_candidates candidates), fixed;
  - s, z the range's scale and zero point; w_floor = floor(w / s);
  - rectified sigmoid h(a) = clip(sigmoid(a) * (zeta - gamma) + gamma, 0, 1), zeta 1.1,
    gamma -0.1; a starts where h(a) equals the fractional part r = w / s - w_floor:
    a = -log((zeta - r) / (r - gamma));
  - soft weight  w_q = s * (clamp(w_floor + h(a) + z, q_min, q_max) - z);
  - loss  mean over tokens of sum over output features of (y_fp - (x_q @ w_q + b))^2
          + lambda * sum(1 - |2 h(a) - 1|^beta),
    the regulariser off for the first `adaround_warmup` fraction of the iterations, then beta
    annealed from adaround_beta[0] to adaround_beta[1] with a cosine;
    x_q: the layer's input in the already-quantized upstream network (earlier layers with
    their hard rounding, activations quantized unless n_bits_act=32), y_fp: the layer's
    output (before its activation function) in the floating-point network;
  - Adam (optax, adaround_lr) on a, `adaround_iters` steps on random minibatches of
    BATCH_ROWS tokens drawn from the `adaround_samples` sequences (padding excluded), as one
    compiled lax.fori_loop;
  - hard rounding w_hard = s * (clamp(w_floor + [a >= 0] + z, q_min, q_max) - z) is written
    into params; the weight's range stays in the 'quant' collection, so the model's weight
    quantizer maps w_hard to itself and `qmodel.apply`, eval.py and int8 need nothing new.
Activation ranges are then re-estimated (the calibration flow's estimators) with the final
weights.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Iterable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import sys

import oqt_jax.quant.calibrate  # noqa: F401  (the module; quant.calibrate is the function)
from oqt_jax.quant import estimators, quantizers
from oqt_jax.quant.hooks import COLLECTION, weight_reduce_axes
from oqt_jax.quant.points import split_name, validate_quant_config

calib = sys.modules['oqt_jax.quant.calibrate']

ZETA, GAMMA = 1.1, -0.1
BATCH_ROWS = 2048          # tokens per optimisation step
SOFT_BAND = (0.01, 0.99)   # h(a) in this open band counts as "not yet rounded"
TAP = 'adaround_input'


# ---- the formulas ----------------------------------------------------------------------------
def rectified_sigmoid(a):
  """h(a) = clip(sigmoid(a) * (zeta - gamma) + gamma, 0, 1)."""
  return jnp.clip(jax.nn.sigmoid(a) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_alpha(w_over_s):
  """a with h(a) = the fractional part of w / s."""
  r = w_over_s - jnp.floor(w_over_s)
  return -jnp.log((ZETA - r) / (r - GAMMA))


def regularizer(h, beta):
  """sum(1 - |2 h - 1|^beta): 0 when every h is 0 or 1."""
  return jnp.sum(1.0 - jnp.abs(2.0 * h - 1.0) ** beta)


def beta_at(i, iters: int, warmup: float, beta=(20.0, 2.0)):
  """beta of iteration i: beta[0] until the warmup ends, then cosine-annealed to beta[1]."""
  start, end = float(beta[0]), float(beta[1])
  t0 = warmup * iters
  rel = jnp.clip((jnp.asarray(i, jnp.float32) - t0) / max(iters - t0, 1.0), 0.0, 1.0)
  return end + 0.5 * (start - end) * (1.0 + jnp.cos(jnp.pi * rel))


def soft_weight(w_floor, h, scale, zero_point, q_min, q_max):
  return scale * (jnp.clip(w_floor + h + zero_point, q_min, q_max) - zero_point)


# ---- capturing a Dense layer's input -----------------------------------------------------------
_CALL_ORDER: list = []


@dataclasses.dataclass(frozen=True)
class _Tap:
  """Hooks that sow every Dense layer's input (through the dot_general hook), delegating the
  rest to `inner` (QuantHooks or None = floating point)."""
  inner: Any = None

  def weight(self, module, name, w):
    return w if self.inner is None else self.inner.weight(module, name, w)

  def act(self, module, name, x, mask):
    return x if self.inner is None else self.inner.act(module, name, x, mask)

  def dot_general(self, module, name, mask=None):
    def dg(lhs, rhs, dims, **kw):
      _CALL_ORDER.append(tuple(module.scope.path))   # trace order = forward order
      module.sow('intermediates', TAP, lhs)
      return jax.lax.dot_general(lhs, rhs, dims)
    return dg


def _capture_fn(model, inner):
  m = model.clone(quant=_Tap(inner))

  def capture(variables, inputs):
    _, upd = m.apply(variables, **inputs, mutable=['intermediates'])
    flat = traverse_util.flatten_dict(flax.core.unfreeze(upd['intermediates']))
    return {k[:-1]: v[0] for k, v in flat.items() if k[-1] == TAP}
  return jax.jit(capture)


def _forward_order(model, variables, inputs) -> list:
  """Module paths of the Dense layers in the order the forward pass calls them."""
  m = model.clone(quant=_Tap(None))
  _CALL_ORDER.clear()
  jax.eval_shape(lambda v, i: m.apply(v, **i, mutable=['intermediates']), variables, inputs)
  order = list(dict.fromkeys(_CALL_ORDER))
  _CALL_ORDER.clear()
  return order


def _rows(x, mask):
  """(N, d_in) valid-token rows of a captured input (B, T, d) or (B, d)."""
  x = np.asarray(x, np.float32)
  if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
    return x[mask.astype(bool)]
  return x.reshape(-1, x.shape[-1])


# ---- one layer -----------------------------------------------------------------------------------
_PROGRESS = {'bar': None, 'every': 1}


def _tick(_):
  bar = _PROGRESS['bar']
  if bar is not None:
    bar.update(_PROGRESS['every'])


@jax.jit
def _layer_mse(w, b, x, y):
  out = x @ w + b
  return jnp.mean(jnp.sum(jnp.square(y - out), axis=-1))


def _optimise_impl(a0, w_floor, scale, zp, q_min, q_max, x, y, b, key, lam, lr, *, iters: int,
                   warmup: float, beta: tuple, batch_rows: int, every: int):
  n = x.shape[0]
  tx = optax.adam(lr)
  warm_iters = warmup * iters

  def loss_fn(a, xb, yb, i):
    h = rectified_sigmoid(a)
    w = soft_weight(w_floor, h, scale, zp, q_min, q_max)
    rec = jnp.mean(jnp.sum(jnp.square(yb - (xb @ w + b)), axis=-1))
    reg = regularizer(h, beta_at(i, iters, warmup, beta))
    return rec + jnp.where(i >= warm_iters, lam, 0.0) * reg

  def body(i, carry):
    a, opt = carry
    if batch_rows >= n:
      xb, yb = x, y
    else:
      idx = jax.random.randint(jax.random.fold_in(key, i), (batch_rows,), 0, n)
      xb, yb = x[idx], y[idx]
    g = jax.grad(loss_fn)(a, xb, yb, i)
    upd, opt = tx.update(g, opt, a)
    a = optax.apply_updates(a, upd)
    jax.lax.cond((i + 1) % every == 0, lambda: jax.debug.callback(_tick, i), lambda: None)
    return a, opt

  a, _ = jax.lax.fori_loop(0, iters, body, (a0, tx.init(a0)))
  return a


_optimise = jax.jit(_optimise_impl, static_argnames=('iters', 'warmup', 'beta', 'batch_rows',
                                                      'every'))


@dataclasses.dataclass
class LayerReport:
  """What AdaRound did to one layer (mse: mean over tokens of the squared output error vs
  the floating-point layer, on the layer's quantized-upstream inputs)."""
  path: str
  point: str
  mse_nearest: float      # round-to-nearest with the same range
  mse_adaround: float     # the hard AdaRound weights
  soft_fraction: float    # fraction of h(a) in (0.01, 0.99) at the end
  flipped_fraction: float  # fraction of weights rounded differently from nearest
  h: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)


# ---- the method ------------------------------------------------------------------------------
def _field(q, name):
  from oqt_jax.quant.points import EXTRA_DEFAULTS
  return q[name] if name in q else EXTRA_DEFAULTS[name]


def _weight_key(qstate_at_path) -> Optional[str]:
  for k in qstate_at_path:
    if isinstance(k, str) and k.startswith('w'):
      try:
        if split_name(k)[0] == 'weight':
          return k
      except ValueError:
        continue
  return None


def _reset_act_ranges(quant_state) -> dict:
  """The collection with every activation range back at its initial (unobserved) state."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(quant_state))
  out = {}
  for path, v in flat.items():
    point = path[-2] if len(path) >= 2 else ''
    is_range = path[-1] in ('x_min', 'x_max', 'n') and 'fp' not in path[:-1]
    is_weight = False
    try:
      is_weight = not point.startswith('in_') and split_name(point)[0] == 'weight'
    except ValueError:
      pass
    out[path] = jnp.zeros_like(v) if is_range and not is_weight else v
  return traverse_util.unflatten_dict(out)


def adaround(model, variables, batches: Iterable[Any], qcfg, *, progress: bool = True,
             seed: int = 0, int8_backend: str = 'aqt', with_report: bool = False):
  """AdaRound of every quantized Dense layer of `model` (module docstring).

  Args:
    model, variables: the floating-point model and its variables ({'params': ...}).
    batches: calibration batches (dicts with input_ids / attention_mask / token_type_ids, or
      input_ids arrays); the first est_num_batches calibrate the ranges, the first batches
      holding adaround_samples sequences feed the optimisation (whole batches).
    qcfg: config.quant (or a full config) with the adaround_* fields; the weights' range
      estimator is replaced by the MSE grid.
    with_report: also return a list of LayerReport.
  Returns:
    (qmodel, qvariables), or (qmodel, qvariables, reports) with `with_report`.
  """
  if 'quant' in qcfg:
    qcfg = qcfg.quant
  validate_quant_config(qcfg)
  cfg = qcfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.ranges_weights = 'mse'
    cfg.mse_search = 'grid'
  iters = int(_field(cfg, 'adaround_iters'))
  samples = int(_field(cfg, 'adaround_samples'))
  lam = float(_field(cfg, 'adaround_lambda'))
  beta = tuple(float(b) for b in _field(cfg, 'adaround_beta'))
  warmup = float(_field(cfg, 'adaround_warmup'))
  lr = float(_field(cfg, 'adaround_lr'))
  n_cal = int(cfg.get('est_num_batches', 16))

  # Enough batches for both calibration and the samples.
  it = iter(batches)
  data, seqs = [], 0
  for b in it:
    data.append(b)
    rows = int(np.shape(b['input_ids'] if isinstance(b, dict) else b)[0])
    seqs += rows
    if len(data) >= n_cal and seqs >= samples:
      break
  if not data:
    raise ValueError('adaround: no calibration batches')
  sample_batches, n = [], 0
  for b in data:
    if n >= samples:
      break
    sample_batches.append(b)
    n += int(np.shape(b['input_ids'] if isinstance(b, dict) else b)[0])

  qmodel, qvars = calib.calibrate(model, variables, data[:n_cal], cfg, progress=progress,
                                  int8_backend=int8_backend)
  hooks = qmodel.quant
  base = calib.strip(variables)
  params = flax.core.unfreeze(base['params'])
  quant_state = flax.core.unfreeze(qvars[COLLECTION])
  inputs = [calib.model_inputs(model, b) for b in sample_batches]
  masks = [None if 'attention_mask' not in i else np.asarray(i['attention_mask'])
           for i in inputs]

  cap_fp = _capture_fn(model.clone(quant=None), None)
  cap_q = _capture_fn(model.clone(quant=None), hooks.with_mode(hooks.eval_mode))
  order = _forward_order(model, base, inputs[0])
  flat_q = traverse_util.flatten_dict(quant_state, keep_empty_nodes=True)
  layers = []
  for path in order:
    prefix = {k[len(path)] for k in flat_q if k[:len(path)] == path and len(k) > len(path)}
    wname = _weight_key(sorted(prefix))
    if wname is None or not hooks.rules.spec(wname).enabled:
      continue
    layers.append((path, wname))

  key = jax.random.PRNGKey(seed)
  reports = []
  bar_cls = None
  if progress:
    from tqdm.auto import tqdm as bar_cls
  for li, (path, wname) in enumerate(layers):
    spec = hooks.rules.spec(wname)
    node = params
    for p in path:
      node = node[p]
    w = jnp.asarray(node['kernel'], jnp.float32)
    b = jnp.asarray(node['bias'], jnp.float32) if 'bias' in node else jnp.zeros(w.shape[-1])
    qnode = quant_state
    for p in path:
      qnode = qnode[p]
    state = qnode[wname]
    axes = weight_reduce_axes(wname, w, hooks.rules.per_channel)
    x_min = quantizers.expand_range(state['x_min'], w.ndim, axes)
    x_max = quantizers.expand_range(state['x_max'], w.ndim, axes)
    s, z, q_min, q_max = quantizers.scale_zero_point(x_min, x_max, spec.n_bits, spec.symmetric)

    cur = dict(base, params=params, **{COLLECTION: quant_state})
    xq = np.concatenate([_rows(cap_q(cur, i)[path], m) for i, m in zip(inputs, masks)])
    xf = np.concatenate([_rows(cap_fp(base, i)[path], m) for i, m in zip(inputs, masks)])
    xq, xf = jnp.asarray(xq), jnp.asarray(xf)
    y = xf @ w + b                      # the floating-point layer's output

    w_over_s = quantizers.true_divide(w, s)
    w_floor = jnp.floor(w_over_s)
    a0 = init_alpha(w_over_s)
    every = max(iters // 100, 1)
    bar = None
    if bar_cls is not None:
      bar = bar_cls(total=iters - iters % every, desc=f'AdaRound {li + 1}/{len(layers)} {wname}',
                    leave=False)
    _PROGRESS.update(bar=bar, every=every)
    try:
      a = _optimise(a0, w_floor, s, z, q_min, q_max, xq, y, b, jax.random.fold_in(key, li),
                    jnp.float32(lam), jnp.float32(lr), iters=iters, warmup=warmup, beta=beta,
                    batch_rows=BATCH_ROWS, every=every)
      a = jax.block_until_ready(a)
      jax.effects_barrier()
    finally:
      if bar is not None:
        bar.close()
      _PROGRESS.update(bar=None)
    w_hard = soft_weight(w_floor, (a >= 0).astype(jnp.float32), s, z, q_min, q_max)
    w_near = quantizers.quantize_dequantize(w, spec.n_bits, spec.symmetric, x_min, x_max)
    h = rectified_sigmoid(a)
    soft = float(jnp.mean((h > SOFT_BAND[0]) & (h < SOFT_BAND[1])))
    reports.append(LayerReport(
        path='/'.join(path), point=wname, mse_nearest=float(_layer_mse(w_near, b, xq, y)),
        mse_adaround=float(_layer_mse(w_hard, b, xq, y)), soft_fraction=soft,
        flipped_fraction=float(jnp.mean(w_hard != w_near)), h=np.asarray(h)))
    node['kernel'] = w_hard.astype(node['kernel'].dtype)

  # Activation ranges again, with the final weights (weight ranges kept).
  if hooks.eval_mode == 'frozen' and any(
      s.enabled for s in (hooks.rules.spec(n) for n in hooks.rules.act_points())):
    quant_state = _reset_act_ranges(quant_state)
    step = calib._step_fn(model.clone(quant=None), hooks, 'calibrating')
    new_base = dict(base, params=params)
    for bt in data[:n_cal]:
      quant_state = step(new_base, quant_state, calib.model_inputs(model, bt))
  qvariables = dict(base, params=params, **{COLLECTION: quant_state})
  for k, v in dict(variables).items():
    if k not in qvariables and k != 'intermediates':
      qvariables[k] = v
  if with_report:
    return qmodel, qvariables, reports
  return qmodel, qvariables


def summary(reports) -> str:
  """One line per layer: output MSE round-to-nearest -> AdaRound, rounding flips."""
  lines = []
  for r in reports:
    lines.append(f'  {r.point:>6}  MSE nearest {r.mse_nearest:.3e} -> AdaRound '
                 f'{r.mse_adaround:.3e}  ({100 * r.flipped_fraction:.1f}% rounded the other way,'
                 f' {100 * r.soft_fraction:.2f}% still soft)')
  return '\n'.join(lines)
