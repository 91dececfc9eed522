"""Uniform fake quantization (quantize-dequantize) with a straight-through estimator.

All functions are pure `jax.numpy` code: they jit, vmap and differentiate. Arithmetic is
float32 whatever the input dtype; `quantize_dequantize` returns the input's dtype.

Asymmetric, b bits (integer grid [0, 2^b - 1]):
  x_min := min(x_min, 0),  x_max := max(x_max, eps)          (the range always contains 0)
  s = max((x_max - x_min) / (2^b - 1), eps)
  z = clamp(round(-x_min / s), 0, 2^b - 1)
  q(x) = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z)

Symmetric, b bits (z = 0), after the same widening of the range:
  signed grid [-2^(b-1), 2^(b-1) - 1] if any x_min < 0, else unsigned grid [0, 2^b - 1];
  s = max(max(|x_min|, x_max) / q_max, eps)       (8-bit signed: absmax / 127)
  q(x) = s * clamp(round(x / s), q_min, q_max)
The signed/unsigned choice is made once per quantizer (over all of its channels), so every
channel shares one integer type; pass `x_neg` to force it.

eps = 1e-8. `round` is round-half-to-even (as numpy and torch). Every division is a true
(single-rounding) float32 division, also for broadcast divisors (`true_divide`), so results
equal the formulas evaluated in float32 NumPy bit for bit.

Straight-through estimator: `round_ste(v) = v + stop_gradient(round(v) - v)` has gradient 1,
and `clamp` has gradient 1 on [lo, hi] (bounds included) and 0 outside. Hence
d q / d x = 1 inside the grid and 0 where clamped. When x_min / x_max are traced arrays
(learned ranges, QAT) their gradients follow from autograd through the same formula
(LSQ-style: d q / d s = round(x/s) - x/s inside the grid, q_min - z or q_max - z where
clamped, ...); nothing blocks them. Ranges computed here from x itself (x_min=None) are
statistics, not parameters: they carry no gradient.

Granularity: x_min / x_max broadcast against x. Per-tensor: scalars. Per-channel weights
(Flax kernel (in, out)): shape (out,) or (1, out). Per-embedding activations (B, T, D): shape
(D,). Per-embedding-group (PEG): K groups of hidden dims, one range per group. A group's range is
estimated on the group's own values (`group_values` gives the (..., K, D/K) view; the
estimator reduces everything but the group axis), then expressed per dim with
`expand_group_ranges` (each dim carries its group's range). With permutation
(`peg_permutation`), dims are sorted by their calibration range ascending (max - min per
batch, averaged over the calibration batches) and cut into K equal contiguous groups, so the
outlier dims share one group and the others keep a fine grid.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-8
MIN_BITS = 2
MAX_BITS = 16
GRANULARITIES = ('per_tensor', 'per_channel', 'per_embd', 'per_embd_group')


def check_bits(n_bits) -> int:
  """Returns n_bits as a Python int; ValueError unless it is an integer in [2, 16]."""
  if isinstance(n_bits, (bool, np.bool_)) or not isinstance(n_bits, (int, np.integer)):
    raise ValueError(f'n_bits must be a Python integer in [{MIN_BITS}, {MAX_BITS}], '
                     f'got {n_bits!r}')
  if not MIN_BITS <= int(n_bits) <= MAX_BITS:
    raise ValueError(f'n_bits must be in [{MIN_BITS}, {MAX_BITS}], got {n_bits}')
  return int(n_bits)


def int_grid(n_bits: int, symmetric: bool, signed: bool = True) -> tuple[float, float]:
  """(q_min, q_max) of the integer grid as Python floats."""
  n_bits = check_bits(n_bits)
  if symmetric and signed:
    return -(2.0 ** (n_bits - 1)), 2.0 ** (n_bits - 1) - 1
  return 0.0, 2.0 ** n_bits - 1


def true_divide(a, b):
  """a / b with one IEEE rounding, also when b is broadcast (a scalar or per-channel divisor).

  XLA's algebraic simplifier rewrites a / broadcast(b) into a * broadcast(1 / b): two
  roundings, up to one ulp off, which can move x / s across a rounding boundary. The divisor
  is therefore made element-dependent, `where(isnan(a), 1, b)` (the same quotient everywhere:
  a NaN numerator gives NaN either way), which the simplifier cannot see as a broadcast; it
  stays inside the elementwise fusion, so nothing of a's size is materialised, and the true
  division of the formulas (and of the PyTorch originals) is kept. (A numerator that is
  itself a broadcast along the same axes as the divisor makes the whole quotient a broadcast
  of a smaller one, which XLA may still rewrite to a multiplication by the reciprocal.)
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  shape = jnp.broadcast_shapes(a.shape, b.shape)
  a = jnp.broadcast_to(a, shape)
  b = jnp.where(jnp.isnan(a), jnp.float32(1), jnp.broadcast_to(b, shape))
  return a / b


def round_ste(x):
  """round(x) (half to even) in the forward pass, identity gradient."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


@jax.custom_jvp
def _round_st(v):
  """round(v) (half to even) with derivative 1: `round_ste` for finite v, written with a
  single use of v, so that XLA fuses the division producing v into its consumers (a second
  use makes it materialise the quotient, a tensor-sized array, e.g. of the LM-head logits)."""
  return jnp.round(v)


_round_st.defjvp(lambda primals, tangents: (jnp.round(primals[0]), tangents[0]))


def clamp(x, lo, hi):
  """clip(x, lo, hi); gradient w.r.t. x is 1 on [lo, hi] (bounds included), 0 outside.

  Where a bound is selected the gradient goes to that bound instead.
  """
  return jnp.where(x < lo, lo, jnp.where(x > hi, hi, x))


def scale_zero_point(x_min, x_max, n_bits, symmetric, x_neg=None, eps: float = EPS):
  """Quantization parameters of the range [x_min, x_max] (module docstring formulas).

  Args:
    x_min, x_max: range arrays (any broadcastable shapes; scalars for per-tensor).
    n_bits: 2..16 (static).
    symmetric: static bool.
    x_neg: symmetric only; True: signed grid, False: unsigned grid, None: signed iff any
      x_min < 0. May be a traced bool.
    eps: floor of x_max and of the scale.

  Returns:
    (scale, zero_point, q_min, q_max), float32. zero_point is integer-valued (0 if symmetric);
    q_min / q_max are float32 scalars.
  """
  n_bits = check_bits(n_bits)
  x_min = jnp.asarray(x_min, jnp.float32)
  x_max = jnp.asarray(x_max, jnp.float32)
  # Widen to contain 0 (and keep x_max > 0 so that the scale is positive).
  x_min = jnp.where(x_min < 0, x_min, jnp.float32(0))
  x_max = jnp.where(x_max > eps, x_max, jnp.float32(eps))
  if not symmetric:
    q_min, q_max = int_grid(n_bits, False)
    scale = true_divide(x_max - x_min, q_max)
    scale = jnp.where(scale > eps, scale, jnp.float32(eps))
    zero_point = clamp(round_ste(true_divide(-x_min, scale)),
                       jnp.float32(q_min), jnp.float32(q_max))
    return scale, zero_point, jnp.float32(q_min), jnp.float32(q_max)

  signed = jnp.any(x_min < 0) if x_neg is None else jnp.asarray(x_neg, bool)
  s_min, s_max = int_grid(n_bits, True, signed=True)
  u_min, u_max = int_grid(n_bits, True, signed=False)
  q_min = jnp.where(signed, jnp.float32(s_min), jnp.float32(u_min))
  q_max = jnp.where(signed, jnp.float32(s_max), jnp.float32(u_max))
  abs_min = -x_min                      # x_min <= 0 here, so |x_min| = -x_min
  absmax = jnp.where(abs_min > x_max, abs_min, x_max)
  scale = true_divide(absmax, q_max)
  scale = jnp.where(scale > eps, scale, jnp.float32(eps))
  return scale, jnp.zeros_like(scale), q_min, q_max


def quantize_dequantize(x, n_bits=8, symmetric=False, x_min=None, x_max=None, *,
                        x_neg=None, eps: float = EPS):
  """Fake-quantizes x to n_bits on the range [x_min, x_max] with the STE.

  x_min / x_max broadcast against x (see module docstring); None: the current min / max of
  x (per tensor, no gradient). Returns an array of x's dtype (float32 for integer inputs).
  """
  x = jnp.asarray(x)
  out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  xf = x.astype(jnp.float32)
  if x_min is None:
    x_min = jax.lax.stop_gradient(jnp.min(xf))
  if x_max is None:
    x_max = jax.lax.stop_gradient(jnp.max(xf))
  scale, zero_point, q_min, q_max = scale_zero_point(
      x_min, x_max, n_bits, symmetric, x_neg=x_neg, eps=eps)
  r = _round_st(true_divide(xf, scale))
  x_int = clamp(r + zero_point, q_min, q_max)
  # round_ste(v) = v + (round(v) - v) is NaN where v = x / s is not finite; so is the result
  # here (r = round(v) is finite exactly where v is).
  out = jnp.where(jnp.isfinite(r), scale * (x_int - zero_point), jnp.float32(jnp.nan))
  return out.astype(out_dtype)


# ----------------------------------------------------------------------------------------
# Granularity helpers
# ----------------------------------------------------------------------------------------

def reduce_axes_for(granularity: str, ndim: int, channel_axis: int = -1) -> tuple[int, ...]:
  """Axes a range estimator reduces over for a granularity.

  'per_tensor': all axes. 'per_channel' / 'per_embd' / 'per_embd_group': all but
  channel_axis (per-embedding-group keeps per-dim statistics; `group_ranges` groups them).
  """
  if granularity == 'per_tensor':
    return tuple(range(ndim))
  if granularity in ('per_channel', 'per_embd', 'per_embd_group'):
    if not -ndim <= channel_axis < ndim:
      raise ValueError(f'channel_axis {channel_axis} out of range for a {ndim}-d tensor '
                       f'({granularity})')
    ca = channel_axis % ndim
    return tuple(a for a in range(ndim) if a != ca)
  raise ValueError(f'granularity must be one of {GRANULARITIES}, got {granularity!r}')


def expand_range(r, ndim: int, reduce_axes: Sequence[int]):
  """Reinserts the reduced axes (size 1) into a range of shape x.shape minus reduce_axes.

  Makes an estimator's result broadcast against x when the kept axis is not the last one
  (e.g. per-channel ranges on axis 0 of an (out, in) matrix).
  """
  axes = sorted(a % ndim for a in reduce_axes) if ndim else []
  r = jnp.asarray(r)
  for a in axes:
    r = jnp.expand_dims(r, a)
  return r


def _check_groups(d: int, n_groups: int) -> None:
  if not isinstance(n_groups, (int, np.integer)) or n_groups < 1:
    raise ValueError(f'n_groups must be a positive integer, got {n_groups!r}')
  if d % n_groups:
    raise ValueError(f'per-embedding-group quantization needs the hidden size to be '
                     f'divisible by the number of groups: {d} % {n_groups} = {d % n_groups}')


def peg_permutation(ranges, n_groups: int):
  """Range-based PEG permutation: the dims sorted by FP range, ascending (stable).

  ranges: (D,) max - min of each hidden dim on calibration data. perm[i] is the dim at
  sorted position i; positions [k*D/K, (k+1)*D/K) form group k, so the K-1'th group holds
  the widest (outlier) dims. ValueError if D % n_groups != 0.
  """
  ranges = jnp.asarray(ranges)
  if ranges.ndim != 1:
    raise ValueError(f'peg_permutation expects a 1-d array of per-dim ranges, '
                     f'got shape {ranges.shape}')
  _check_groups(ranges.shape[0], n_groups)
  return jnp.argsort(ranges, stable=True).astype(jnp.int32)


def group_index(d: int, n_groups: int, perm=None):
  """(D,) int32 group id of each hidden dim.

  Without perm, contiguous groups of the natural order (dim j -> j // (D/K)); with perm,
  contiguous groups of the permuted order (dim perm[i] -> i // (D/K)).
  """
  _check_groups(int(d), n_groups)
  size = int(d) // int(n_groups)
  pos_group = jnp.arange(d, dtype=jnp.int32) // size
  if perm is None:
    return pos_group
  perm = jnp.asarray(perm, jnp.int32)
  if perm.shape != (d,):
    raise ValueError(f'perm must have shape ({d},), got {perm.shape}')
  return jnp.zeros((d,), jnp.int32).at[perm].set(pos_group)


def group_ranges(x_min_d, x_max_d, group_ids, n_groups: int):
  """Per-dim ranges -> each group's (min of x_min, max of x_max), broadcast back per dim.

  x_min_d, x_max_d: (..., D) ranges on the last axis; group_ids: (D,) from `group_index`.
  Returns (x_min_per_dim, x_max_per_dim) of the inputs' shapes, ready for
  `quantize_dequantize`.
  """
  group_ids = jnp.asarray(group_ids, jnp.int32)

  def regroup(r, seg):
    r = jnp.moveaxis(jnp.asarray(r, jnp.float32), -1, 0)
    g = seg(r, group_ids, num_segments=n_groups, indices_are_sorted=False)
    return jnp.moveaxis(g[group_ids], 0, -1)

  return (regroup(x_min_d, jax.ops.segment_min), regroup(x_max_d, jax.ops.segment_max))


def group_values(x, group_ids, n_groups: int):
  """(..., D) -> (..., K, D/K): the values of each group (group k = the dims whose id is k).

  Within a group the dims keep their natural order; a range estimator applied to this view
  with every axis but the group axis (-2) reduced gives one range per group, estimated on
  the group's own values (its min / max, percentile or MSE range).
  """
  x = jnp.asarray(x)
  d = x.shape[-1]
  _check_groups(d, n_groups)
  order = jnp.argsort(jnp.asarray(group_ids, jnp.int32), stable=True)
  return jnp.take(x, order, axis=-1).reshape(x.shape[:-1] + (n_groups, d // n_groups))


def expand_group_ranges(g_min, g_max, group_ids):
  """Per-group ranges (K,) -> per-dim ranges (D,): dim j carries its group's range."""
  group_ids = jnp.asarray(group_ids, jnp.int32)
  return jnp.asarray(g_min)[group_ids], jnp.asarray(g_max)[group_ids]


def group_view(x, n_groups: int, perm=None):
  """(..., D) -> (..., K, D/K): the hidden dims permuted (if perm) and cut into K groups.

  Estimating ranges on this view with the last axis (and the leading ones) reduced gives
  one range per group directly, e.g. for a running average of the group ranges themselves.
  """
  x = jnp.asarray(x)
  d = x.shape[-1]
  _check_groups(d, n_groups)
  if perm is not None:
    x = jnp.take(x, jnp.asarray(perm, jnp.int32), axis=-1)
  return x.reshape(x.shape[:-1] + (n_groups, d // n_groups))


# ---- the original's uniform quantizer with learnable (delta, zero_float) (QAT) --------------
def minmax_quantize(x, delta, zero_float, q_min, q_max, eps: float = EPS):
  """The original's AsymmetricUniformQuantizer (zero_float given) / SymmetricUniformQuantizer
  (zero_float None) forward pass, differentiable in delta and zero_float:
    scale = clamp(delta, min=eps)
    z     = clamp(round_ste(zero_float), q_min, q_max)           (0 if symmetric)
    x_int = clamp(round_ste(x / scale) + z, q_min, q_max)
    q(x)  = scale * (x_int - z)
  (round half to even, clamp gradients 1 on [lo, hi] bounds included, as torch). delta and
  zero_float broadcast against x; arithmetic in float32, the output has x's dtype."""
  xf = jnp.asarray(x, jnp.float32)
  delta = jnp.asarray(delta, jnp.float32)
  scale = jnp.where(delta < eps, jnp.float32(eps), delta)
  if zero_float is None:
    z = jnp.float32(0)
  else:
    z = clamp(round_ste(jnp.asarray(zero_float, jnp.float32)), q_min, q_max)
  x_int = clamp(round_ste(true_divide(xf, scale)) + z, q_min, q_max)
  return (scale * (x_int - z)).astype(jnp.asarray(x).dtype)
