"""AdaRound (Nagel et al., 2020): learned rounding of the weights, layer by layer, in the
setting of transformer-quantization (Bondarenko et al., 2021).

  qmodel, qvariables = quant.adaround(model, variables, batches, qcfg)
  qmodel, qvariables = quant.adaround(model, variables, batches, quant.config(**PRESET))

Layers: every module with a quantized weight ('all'), in forward order: the embedding
tables (Et, Ets, Ep; the tied LM decoder 'wM' reuses the rounded word table), every
LayerNorm gamma, every Dense kernel (heads included where they are quantized).

Per layer, with the weight's range fixed (the MSE grid over quant.num_candidates candidates,
per tensor or per output channel as quant.per_channel), s, z its scale and zero point:
  - rectified sigmoid h(a) = clamp(sigmoid(a) (zeta - gamma) + gamma, 0, 1), zeta 1.1,
    gamma -0.1 (the clamp passes the gradient on [0, 1], ends included, as torch.clamp);
  - a starts where h(a) is the fractional part r = w / s - floor(w / s):
    a = -log((zeta - r) / (r - gamma));
  - soft weight  w_q = s (clamp(floor(w / s) + h(a) + z, q_min, q_max) - z);
  - the layer's output includes its activation function (Dense + GELU of the FFN, + tanh
    of the pooler): out = act(x w_q + b); an embedding: out = w_q[ids]; a LayerNorm:
    out = x_hat w_q + beta;
  - x: the layer's input in the network whose weights are quantized (the layers already
    done with their hard rounding, the rest round-to-nearest) and whose activations are
    floating point; target: the layer's output in the floating-point network;
  - loss at iteration t = 1 .. iters (counted from 1):
      rec = mean over (sequences, features) of the sum over tokens of (out - target)^2
            (an (N, T, D) output: sum over axis 1, mean over the rest; an (N, D) output, e.g.
            the pooler: sum over features, mean over sequences);
      + lambda_t sum(1 - (2 |h(a) - 0.5|)^beta_t),  lambda_t = 0 while t < warmup * iters,
      beta_t = beta0 until t = warmup * iters, then
      beta1 + (beta0 - beta1) (1 + cos(pi (t - warmup iters) / (iters - warmup iters))) / 2;
  - torch.optim.Adam's update on a (lr, betas (0.9, 0.999), eps 1e-8 added to the
    bias-corrected sqrt of the second moment, no weight decay), one step per minibatch of
    BATCH_SIZE whole sequences drawn without replacement (a fresh permutation each step)
    from the adaround_samples sequences; every token of a sequence counts, padding included
    (the original pads to max_seq_length); the whole loop is one compiled lax.scan;
  - the hard rounding  w_hard = s (clamp(floor(w / s) + [a >= 0] + z, q_min, q_max) - z) is
    written into params; the weight's range stays in the 'quant' collection, so the model's
    weight quantizer maps w_hard to itself and `qmodel.apply`, eval.py and int8 need
    nothing new.
Activation ranges are then re-estimated with the final weights (the original's
'post_adaround'), where activations are quantized.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Callable, Iterable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import oqt_jax.quant.calibrate  # noqa: F401  (the module; quant.calibrate is the function)
from oqt_jax.models.layers import ACTIVATIONS
from oqt_jax.quant import quantizers
from oqt_jax.quant.layout import COLLECTION, weight_reduce_axes
from oqt_jax.quant.points import EXTRA_DEFAULTS, FP_ACT_BITS, derive, resolved, split_name

calib = sys.modules['oqt_jax.quant.calibrate']

ZETA, GAMMA = 1.1, -0.1
BATCH_SIZE = 8             # whole sequences per step (the original's training batch size)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
SOFT_BAND = (0.01, 0.99)   # h(a) in this open band counts as "not yet rounded"

# The original's AdaRound row (its README: W4A32 PTQ, symmetric per-tensor 4-bit weights,
# MSE grid range with 100 candidates, quant setup 'all', AdaRound on all layers with 1024
# samples, FP activations); iterations: the CLI default 1000 (the README recipe runs 10000).
PRESET: dict = dict(
    n_bits=4, n_bits_act=FP_ACT_BITS, qmethod='symmetric_uniform', per_channel=False,
    ranges_weights='mse', mse_search='grid', num_candidates=100, quant_setup='all',
    quant_dict='', adaround_iters=1000, adaround_samples=1024, adaround_lambda=0.01,
    adaround_beta=(20.0, 2.0), adaround_warmup=0.2, adaround_lr=1e-3)


# ---- the formulas ----------------------------------------------------------------------------
def torch_clamp(x, lo, hi):
  """clamp(x, lo, hi) whose gradient is 1 on [lo, hi] (ends included) and 0 outside, as
  torch.clamp (jnp.clip splits the gradient at the ends)."""
  return jnp.where((x >= lo) & (x <= hi), x, jnp.clip(x, lo, hi))


def rectified_sigmoid(a):
  """h(a) = clamp(sigmoid(a) * (zeta - gamma) + gamma, 0, 1)."""
  return torch_clamp(jax.nn.sigmoid(a) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_alpha(w_over_s):
  """a with h(a) = the fractional part r of w / s: -log((zeta - r) / (r - gamma))."""
  r = w_over_s - jnp.floor(w_over_s)
  return -jnp.log((ZETA - r) / (r - GAMMA))


def regularizer(h, beta):
  """sum(1 - (2 |h - 0.5|)^beta): 0 when every h is 0 or 1."""
  return jnp.sum(1.0 - jnp.power(jnp.abs(h - 0.5) * 2.0, beta))


def beta_at(t, iters: int, warmup: float, beta=(20.0, 2.0)) -> float:
  """beta of iteration t (counted from 1): beta[0] before warmup * iters, then cosine."""
  start, end = float(beta[0]), float(beta[1])
  t0 = warmup * iters
  if t < t0:
    return start
  rel = (t - t0) / (iters - t0)
  return end + 0.5 * (start - end) * (1.0 + np.cos(rel * np.pi))


def schedule(iters: int, warmup: float, beta, lam: float, lr: float,
             dtype=np.float32) -> dict:
  """Per-iteration constants (t = 1 .. iters): beta_t, lambda_t, and torch Adam's step size
  lr / (1 - b1^t) and sqrt(1 - b2^t) (computed in float64, as Python floats, then cast)."""
  t = np.arange(1, iters + 1, dtype=np.float64)
  b1, b2 = ADAM_BETAS
  return dict(
      beta=np.asarray([beta_at(i, iters, warmup, beta) for i in t], dtype),
      lam=np.where(t < iters * warmup, 0.0, lam).astype(dtype),
      step=np.asarray([lr / (1.0 - b1 ** i) for i in t], dtype),
      bc2=np.asarray([np.sqrt(1.0 - b2 ** i) for i in t], dtype))


def soft_weight(w_floor, h, scale, zero_point, q_min, q_max):
  return scale * (torch_clamp(w_floor + h + zero_point, q_min, q_max) - zero_point)


def reconstruction_loss(out, target, valid=None):
  """(out - target)^2 summed over axis 1 (tokens of (N, T, D); features of (N, D)), then
  averaged over the remaining axes. valid (N, T): tokens that exist (sequences of different
  lengths stacked), None: all."""
  sq = jnp.square(out - target)
  if valid is not None and sq.ndim == 3:
    sq = sq * valid[:, :, None]
  return jnp.mean(jnp.sum(sq, axis=1))


def layer_forward(kind: str, w, x, bias=None, activation: Optional[str] = None):
  """The layer with weight w: 'dense' act(x @ w + b) (w: (in, out)); 'embed' w[x];
  'ln' x * w + b (x: the normalised input)."""
  if kind == 'embed':
    return jnp.take(w, x, axis=0)
  if kind == 'ln':
    return x * w if bias is None else x * w + bias
  y = jnp.einsum('...i,io->...o', x, w)
  if bias is not None:
    y = y + bias
  return y if activation is None else ACTIVATIONS[activation](y)


def random_sampler(seed: int = 0) -> Callable:
  """sampler(n, iters, batch, layer) -> (iters, min(batch, n)) sequence indices: a fresh
  random permutation of the n sequences each iteration, its first `batch` (torch.randperm
  (n)[:batch] of the original), from numpy's generator seeded with (seed, layer)."""
  def sample(n, iters, batch, layer):
    rng = np.random.default_rng([seed, layer])
    return np.stack([rng.permutation(n)[:batch] for _ in range(iters)]).astype(np.int32)
  return sample


# ---- one layer -----------------------------------------------------------------------------------
_PROGRESS = {'bar': None, 'every': 1}


def _tick(_):
  bar = _PROGRESS['bar']
  if bar is not None:
    bar.update(_PROGRESS['every'])


def _optimise_impl(a0, w_floor, scale, zp, q_min, q_max, x, y, valid, bias, idx, sched, *,
                   kind: str, activation: Optional[str], trace: bool, every: int):
  b1, b2 = ADAM_BETAS

  def loss_fn(a, xb, yb, vb, beta, lam):
    h = rectified_sigmoid(a)
    w = soft_weight(w_floor, h, scale, zp, q_min, q_max)
    rec = reconstruction_loss(layer_forward(kind, w, xb, bias, activation), yb, vb)
    return rec + lam * regularizer(h, beta)

  def body(carry, step):
    a, m, v, i = carry
    ids, beta, lam, ss, bc2 = step
    vb = None if valid is None else valid[ids]
    loss, g = jax.value_and_grad(loss_fn)(a, x[ids], y[ids], vb, beta, lam)
    m = m + (g - m) * (1.0 - b1)                     # torch: exp_avg.lerp_(grad, 1 - beta1)
    v = v * b2 + (g * g) * (1.0 - b2)                # exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
    denom = jnp.sqrt(v) / bc2 + ADAM_EPS
    a = a + (-ss) * (m / denom)                      # param.addcdiv_(exp_avg, denom, -step)
    if every:
      jax.lax.cond((i + 1) % every == 0, lambda: jax.debug.callback(_tick, i), lambda: None)
    return (a, m, v, i + 1), (loss, a) if trace else (loss, None)

  zeros = jnp.zeros_like(a0)
  steps = (idx, sched['beta'], sched['lam'], sched['step'], sched['bc2'])
  (a, _, _, _), (losses, hist) = jax.lax.scan(body, (a0, zeros, zeros, jnp.int32(0)), steps)
  return a, losses, hist


_optimise = jax.jit(_optimise_impl, static_argnames=('kind', 'activation', 'trace', 'every'))


def optimise_layer(kind: str, w, scale, zero_point, q_min, q_max, x, target, *, indices,
                   bias=None, activation: Optional[str] = None, valid=None,
                   iters: Optional[int] = None, lam: float = 0.01, lr: float = 1e-3,
                   warmup: float = 0.2, beta=(20.0, 2.0), trace: bool = False,
                   progress_every: int = 0, dtype=jnp.float32):
  """AdaRound of one layer (module docstring). x: the cached layer inputs, one row per
  sequence ((N, T, d_in), (N, d_in), ids (N, T), or the normalised LN input); target: the
  floating-point layer's outputs; indices (iters, batch): the sequences of each step.
  Returns dict(alpha=a after the last step, w_hard, loss (iters,) and with trace=True
  alphas (iters, *w.shape): a after each step). dtype: of the whole computation (float64
  needs jax.enable_x64)."""
  f = lambda v: None if v is None else jnp.asarray(v, dtype)
  w, scale, zero_point, q_min, q_max = map(f, (w, scale, zero_point, q_min, q_max))
  x = jnp.asarray(x) if kind == 'embed' else f(x)
  indices = jnp.asarray(indices, jnp.int32)
  iters = int(indices.shape[0]) if iters is None else int(iters)
  # w / s with one rounding (the divisor made element-dependent, quantizers.true_divide)
  w_over_s = w / jnp.where(jnp.isnan(w), jnp.ones((), dtype), jnp.broadcast_to(scale, w.shape))
  w_floor = jnp.floor(w_over_s)
  a0 = init_alpha(w_over_s)
  sched = {k: f(v) for k, v in schedule(iters, warmup, beta, lam, lr, dtype=np.dtype(dtype)).items()}
  args = (a0, w_floor, scale, zero_point, q_min, q_max, x, f(target), f(valid), f(bias),
          indices[:iters], sched)
  a, losses, hist = _optimise(*args, kind=kind, activation=activation, trace=trace,
                              every=int(progress_every))
  w_hard = soft_weight(w_floor, (a >= 0).astype(jnp.float32), scale, zero_point, q_min, q_max)
  out = dict(alpha=a, w_hard=w_hard, loss=losses, a0=a0)
  if trace:
    out['alphas'] = hist
  return out



# ---- the layers of a model, their inputs and outputs ------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layer:
  """A module with a weight: its path, weight point, kind ('dense' | 'embed' | 'ln'), the
  Dense layer's fused activation, the LayerNorm's eps and whether it is a single-scale RMSNorm
  (`rms`: no mean subtraction, no bias)."""
  path: tuple
  point: str
  kind: str
  activation: Optional[str] = None
  eps: float = 0.0
  rms: bool = False

  @property
  def param(self) -> str:
    return {'dense': 'kernel', 'embed': 'embedding', 'ln': 'scale'}[self.kind]


def _as_layer(ctx, args, kwargs) -> Optional[Layer]:
  """The Layer of a module call (None: not a weighted module, or an Embed's tied decoder)."""
  mod = ctx.module
  if ctx.method_name != '__call__':
    return None
  path = tuple(mod.scope.path)
  kind = type(mod).__name__
  if kind == 'Dense':
    return Layer(path, mod.wpoint or 'w' + mod.point, 'dense', mod.activation)
  if kind == 'Embed':
    ids = args[0] if args else kwargs.get('ids')
    if ids is None:   # the tied decoder (attend): its table is the rounded lookup table
      return None
    return Layer(path, kwargs.get('wpoint') or mod.wpoint, 'embed')
  if kind == 'LayerNorm':
    return Layer(path, 'w' + mod.point, 'ln', eps=float(mod.eps), rms=mod.kind == 'ssnorm')
  return None


def forward_layers(model, variables, inputs) -> list:
  """Every weighted module call of the floating-point model, in forward order."""
  calls = []

  def record(next_fun, args, kwargs, ctx):
    layer = _as_layer(ctx, args, kwargs)
    if layer is not None and all(c.path != layer.path for c in calls):
      calls.append(layer)
    return next_fun(*args, **kwargs)

  fp = model.clone(quant=None)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, i: fp.apply(v, **i), variables, inputs)
  return calls


def _tap_all(model, layers: tuple):
  """run(variables, inputs) -> [(x, y) of each layer]: the floating-point model with a tap on
  every layer's call (a LayerNorm's input normalised as the module does)."""
  fp = model.clone(quant=None)
  wanted = set(layers)

  def run(variables, inputs):
    rec = {}

    def tap(next_fun, args, kwargs, ctx):
      out = next_fun(*args, **kwargs)
      layer = _as_layer(ctx, args, kwargs)
      if layer in wanted and layer not in rec:
        x = args[0] if args else next(iter(kwargs.values()))
        if layer.kind == 'ln':
          xf = x.astype(jnp.float32)
          mu = 0.0 if layer.rms else jnp.mean(xf, axis=-1, keepdims=True)
          var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
          x = (xf - mu) * jax.lax.rsqrt(var + layer.eps)
        elif layer.kind == 'dense':
          x = x.astype(jnp.float32)
        rec[layer] = (x, (out[0] if isinstance(out, tuple) else out).astype(jnp.float32))
      return out

    with nn.intercept_methods(tap):
      fp.apply(variables, **inputs)
    return [rec[l] for l in layers]
  return run


@functools.lru_cache(maxsize=16)
def _select_fn(model, layers: tuple, members: tuple):
  """jit(variables, inputs, k) -> the (x, y) of layers[members[k]] (one compiled function for a
  group of layers with equal shapes; cached per model)."""
  run = _tap_all(model, layers)

  def select(variables, inputs, k):
    rec = run(variables, inputs)
    pairs = tuple(rec[i] for i in members)
    if len(pairs) == 1:
      return pairs[0]
    return jax.lax.switch(k, [functools.partial(lambda j, p: p[j], j)
                              for j in range(len(pairs))], pairs)
  return jax.jit(select)


class Capture:
  """The input and output of any layer in the floating-point model run with given variables
  (a LayerNorm's input normalised): capture(variables, inputs, layer) -> (x, y). One compiled
  function per group of layers with the same shapes, which selects the layer's pair with a
  dynamic index, so a model compiles a handful of functions, not one per layer."""

  def __init__(self, model, layers, variables, inputs):
    layers = tuple(layers)
    shapes = jax.eval_shape(_tap_all(model, layers), variables, inputs)
    groups: dict = {}
    for i, (x, y) in enumerate(shapes):
      groups.setdefault((x.shape, str(x.dtype), y.shape), []).append(i)
    self._where = {}
    for members in groups.values():
      fn = _select_fn(model, layers, tuple(members))
      for k, i in enumerate(members):
        self._where[layers[i]] = (fn, k)

  def __call__(self, variables, inputs, layer):
    fn, k = self._where[layer]
    return fn(variables, inputs, jnp.int32(k))


def _stack(rows: list):
  """Arrays with one row per sequence (N_i, T_i, ...) stacked along axis 0, the token axis
  padded to the longest; returns (stacked, valid (N, T) float or None when nothing is
  padded)."""
  if rows[0].ndim < 2 or len({r.shape[1] for r in rows}) == 1:
    return np.concatenate(rows), None
  t = max(r.shape[1] for r in rows)
  padded, valid = [], []
  for r in rows:
    pad = [(0, 0)] * r.ndim
    pad[1] = (0, t - r.shape[1])
    padded.append(np.pad(r, pad))
    v = np.zeros((r.shape[0], t), np.float32)
    v[:, :r.shape[1]] = 1.0
    valid.append(v)
  return np.concatenate(padded), np.concatenate(valid)


@dataclasses.dataclass
class LayerReport:
  """What AdaRound did to one layer (mse: the reconstruction loss over all samples, the
  optimisation's reduction, vs the floating-point layer on the same inputs)."""
  path: str
  point: str
  kind: str
  mse_nearest: float      # round-to-nearest with the same range
  mse_adaround: float     # the hard AdaRound weights
  soft_fraction: float    # fraction of h(a) in (0.01, 0.99) at the end
  flipped_fraction: float  # fraction of weights rounded differently from nearest
  h: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)


def _rec(layer: Layer, w, bias, x, y, valid) -> float:
  return float(reconstruction_loss(layer_forward(layer.kind, w, x, bias, layer.activation), y,
                                   None if valid is None else jnp.asarray(valid)))


# ---- the method ------------------------------------------------------------------------------
def _field(q, name):
  return q[name] if name in q else EXTRA_DEFAULTS[name]


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


def _rows(b) -> int:
  return int(np.shape(b['input_ids'] if isinstance(b, dict) else b)[0])


def _take_rows(b, n: int):
  if isinstance(b, dict):
    return {k: (v[:n] if v is not None and np.ndim(v) >= 1 else v) for k, v in b.items()}
  return b[:n]


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def adaround(model, variables, batches: Iterable[Any], qcfg, progress: bool = False, *,
             seed: int = 0, sampler: Optional[Callable] = None, batch_size: int = BATCH_SIZE,
             int8_backend: str = 'aqt', with_report: bool = False):
  """AdaRound of every module with a quantized weight of `model` (module docstring).

  Args:
    model, variables: the floating-point model and its variables ({'params': ...}).
    batches: dicts with input_ids / attention_mask (/ token_type_ids), or input_ids arrays;
      the first est_num_batches calibrate the ranges, the first adaround_samples sequences
      feed the optimisation.
    qcfg: config.quant (or a full config) with the adaround_* fields (PRESET: the
      original's setting); the weights' range estimator is the MSE grid.
    seed / sampler: the minibatches: sampler(n, iters, batch_size, layer index) -> (iters,
      batch) sequence indices; default random_sampler(seed).
    batch_size: sequences per step.
    with_report: also return a list of LayerReport.
  Returns:
    (qmodel, qvariables), or (qmodel, qvariables, reports) with `with_report`.
  """
  cfg = derive(resolved(qcfg), ranges_weights='mse', mse_search='grid')
  iters = int(_field(cfg, 'adaround_iters'))
  samples = int(_field(cfg, 'adaround_samples'))
  lam = float(_field(cfg, 'adaround_lambda'))
  beta = tuple(float(b) for b in _field(cfg, 'adaround_beta'))
  warmup = float(_field(cfg, 'adaround_warmup'))
  lr = float(_field(cfg, 'adaround_lr'))
  n_cal = int(cfg.get('est_num_batches', 16))
  sampler = sampler or random_sampler(seed)

  data, sample_batches, seqs = [], [], 0
  for b in batches:
    if len(data) < n_cal:
      data.append(b)
    if seqs < samples:
      take = min(_rows(b), samples - seqs)
      sample_batches.append(b if take == _rows(b) else _take_rows(b, take))
      seqs += take
    if len(data) >= n_cal and seqs >= samples:
      break
  if not data:
    raise ValueError('adaround: no calibration batches')

  qmodel, qvars = calib.calibrate(model, variables, data, cfg, progress=progress,
                                  int8_backend=int8_backend)
  hooks = qmodel.quant
  rules = hooks.rules
  base = calib.strip(variables)
  params = flax.core.unfreeze(base['params'])
  quant_state = flax.core.unfreeze(qvars[COLLECTION])
  inputs = [calib.model_inputs(model, b) for b in sample_batches]

  def weight_state(layer):
    try:
      return _get(quant_state, layer.path)[layer.point]
    except (KeyError, TypeError):
      return None

  layers = [l for l in forward_layers(model, base, inputs[0])
            if rules.spec(l.point).enabled and weight_state(l) is not None]

  def grid(layer, w):
    spec = rules.spec(layer.point)
    state = weight_state(layer)
    axes = weight_reduce_axes(layer.point, w, rules.per_channel)
    x_min = quantizers.expand_range(state['x_min'], w.ndim, axes)
    x_max = quantizers.expand_range(state['x_max'], w.ndim, axes)
    s, z, q_min, q_max = quantizers.scale_zero_point(x_min, x_max, spec.n_bits, spec.symmetric,
                                                     x_neg=spec.x_neg)
    near = quantizers.quantize_dequantize(w, spec.n_bits, spec.symmetric, x_min, x_max,
                                          x_neg=spec.x_neg)
    return s, z, q_min, q_max, near

  # The network with quantized weights (round-to-nearest until a layer is done).
  params_q = jax.tree.map(lambda v: v, params)
  for l in layers:
    node = _get(params_q, l.path)
    node[l.param] = grid(l, jnp.asarray(node[l.param], jnp.float32))[-1]

  capture = Capture(model, layers, base, inputs[0])
  reports = []
  bar_cls = None
  if progress:
    from tqdm.auto import tqdm as bar_cls
  for li, layer in enumerate(layers):
    node = _get(params, layer.path)
    w = jnp.asarray(node[layer.param], jnp.float32)
    bias = None
    if 'bias' in node and layer.kind != 'embed':
      bias = jnp.asarray(node['bias'], jnp.float32)
    s, z, q_min, q_max, w_near = grid(layer, w)

    xs, ys = [], []
    for inp in inputs:
      xs.append(np.asarray(capture(dict(base, params=params_q), inp, layer)[0]))
      ys.append(np.asarray(capture(dict(base, params=params), inp, layer)[1]))
    x, valid = _stack(xs)
    y, _ = _stack(ys)
    x, y = jnp.asarray(x), jnp.asarray(y)
    idx = np.asarray(sampler(x.shape[0], iters, batch_size, li), np.int32)

    every = max(iters // 100, 1)
    bar = None
    if bar_cls is not None:
      bar = bar_cls(total=iters - iters % every, leave=False,
                    desc=f'AdaRound {li + 1}/{len(layers)} {layer.point}')
    _PROGRESS.update(bar=bar, every=every)
    try:
      res = optimise_layer(layer.kind, w, s, z, q_min, q_max, x, y, indices=idx, bias=bias,
                           activation=layer.activation, valid=valid, iters=iters, lam=lam,
                           lr=lr, warmup=warmup, beta=beta,
                           progress_every=every if bar is not None else 0)
      jax.block_until_ready(res['alpha'])
      jax.effects_barrier()
    finally:
      if bar is not None:
        bar.close()
      _PROGRESS.update(bar=None)
    w_hard = res['w_hard']
    h = rectified_sigmoid(res['alpha'])
    reports.append(LayerReport(
        path='/'.join(layer.path), point=layer.point, kind=layer.kind,
        mse_nearest=_rec(layer, w_near, bias, x, y, valid),
        mse_adaround=_rec(layer, w_hard, bias, x, y, valid),
        soft_fraction=float(jnp.mean((h > SOFT_BAND[0]) & (h < SOFT_BAND[1]))),
        flipped_fraction=float(jnp.mean(w_hard != w_near)), h=np.asarray(h)))
    node[layer.param] = w_hard.astype(node[layer.param].dtype)
    _get(params_q, layer.path)[layer.param] = node[layer.param]

  # Activation ranges again, with the final weights (weight ranges kept).
  if hooks.eval_mode == 'frozen' and any(
      sp.enabled for sp in (rules.spec(n) for n in rules.act_points())):
    quant_state = _reset_act_ranges(quant_state)
    step = calib._step_fn(model.clone(quant=None), hooks, 'calibrating')
    new_base = dict(base, params=params)
    for bt in data:
      quant_state = step(new_base, quant_state, calib.model_inputs(model, bt))
  qvariables = dict(base, params=params, **{COLLECTION: quant_state})
  for k, v in dict(variables).items():
    if k not in qvariables and k != 'intermediates':
      qvariables[k] = v
  if with_report:
    return qmodel, qvariables, reports
  return qmodel, qvariables


def summary(reports) -> str:
  """One line per layer: reconstruction loss round-to-nearest -> AdaRound, rounding flips."""
  lines = []
  for r in reports:
    lines.append(f'  {r.point:>6}  loss nearest {r.mse_nearest:.3e} -> AdaRound '
                 f'{r.mse_adaround:.3e}  ({100 * r.flipped_fraction:.1f}% rounded the other way,'
                 f' {100 * r.soft_fraction:.2f}% still soft)')
  return '\n'.join(lines)
