"""Range estimators: pure (state, x, mask) -> state updates.

A state is a dict of arrays, so it can live in a Flax variable collection (e.g. `quant`):
  {'x_min': float32 (S,), 'x_max': float32 (S,), 'n': int32 ()}     (init_state(S))
where S is x's shape with `reduce_axes` removed (() per tensor, (D,) per embedding, (out,)
per channel) and n counts the batches seen (a batch with no valid entry is not seen).

`update(kind, state, x, ...)` estimators (momentum m, default 0.9):
  current_minmax   x_min, x_max = min / max of the batch (replaces the state).
  running_minmax   EMA: r = (1 - m) * r_batch + m * r; the first batch (n == 0) initialises.
  allminmax        global min / max over all batches.
  percentile p     per batch the (100 - p)-th and p-th percentiles (numpy's 'linear'
                   interpolation) of the valid entries, BOTH tails, then the EMA above.
                   (The original clipped only the minimum in its per-tensor path.)
                   A config with ranges_*='running_minmax' and percentile p > 0 resolves to
                   this kind (quant/points.py): the originals' OPT recipe "running_minmax,
                   percentile 99.999" is an EMA of per-batch percentiles, not of min / max.
  mse              the range minimising sum over valid entries of (q(x) - x)^2, then the EMA.
  cross_entropy    as mse with the loss sum_rows CE(softmax(t), log_softmax(q(x))) over the
                   last (class) axis, t = logits_target if given else x (FP logits). The
                   class axis must be reduced; a row counts if its mask is True on every
                   class (a token mask broadcast along the classes).

Masks: `mask` (bool) selects the entries that count; masked-out entries (padding tokens) never
enter any statistic. It broadcasts against x by numpy rules, or, if its shape is a prefix of
x's (a (B, T) token mask for a (B, T, D) tensor), by appending axes. A kept slice (channel)
with no valid entry in a batch keeps its previous state; a batch with no valid entry at all
leaves the whole state unchanged, its count included.

MSE / cross-entropy search. The search is independent per kept slice (per channel /
embedding), vectorised over slices. Let mn, mx be the slice's (masked) min / max and margin
the absolute range margin (0.5 by default, in x's units, as in the original):

  one-sided data (mn >= 0; for a symmetric quantizer decided over the whole tensor, so every
  channel keeps the grid type the quantizer will use, for an asymmetric one per slice; never
  for a symmetric quantizer with signed=True, the signed grid whatever the data), or a
  symmetric quantizer: a 1-D search over t with range [0, t] (one-sided) or [-t, t],
    R = max(|mn|, mx) + margin.
  otherwise (asymmetric, two-sided): a 2-D search over a half-width r and a shift.

  'grid' (num_candidates N):
    1-D: t_k = k * R / N, k = 1..N.
    2-D: R = max(|mx + margin|, |mn - margin|); for k = 1..N, j = 0..S-1, sign +/-:
         delta_k = 2 k (R/N) / (2^b - 1), skew = +/- j * stride * delta_k,
         range = [max(-k R/N + skew, mn - margin), min(k R/N + skew, mx + margin)],
         S = min(2^b // 4, 64) shifts of stride (2^b // 4) / S grid steps (for b <= 8: all
         2^b // 4 integer shifts, as in the original).
    The first candidate with the smallest loss wins (order k, j, sign), kept as a running
    minimum over chunks of candidates, so no (candidates x slices) array is formed. mse:
    each chunk's squared errors are summed in cache-sized blocks by one jitted loop over
    tiles of the tensor (no error array of the tensor's size, no per-candidate dispatch),
    with the quantizer's own arithmetic; cross_entropy: vmapped chunks of bounded memory.
  'golden' (golden_iters iterations of golden-section search, a jax loop):
    1-D: t in [0.01 R, R].
    2-D: nested: r in [0.01 R, R]; for each r the shift in [-m_r, m_r],
         m_r = (2 r / (2^b - 1)) * (2^b // 4), range = [-r + shift, r + shift].
  Divergences from the original, on purpose: the search range is each channel's own (the
  original used the whole tensor's range for every channel), and successive batches are
  searched independently and combined with the EMA (the original summed the candidates'
  losses over batches on a grid fixed by the first batch); for one batch (weights) the two
  agree.

All functions jit with kind and the integer / boolean flags static; `update` compiles its core
with `jax.jit` and is inlined when called under an outer jit.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from oqt_jax.quant.quantizers import (check_bits, int_grid, quantize_dequantize,
                                      scale_zero_point, true_divide)

ESTIMATORS = ('current_minmax', 'running_minmax', 'allminmax', 'percentile', 'mse',
              'cross_entropy')
MSE_SEARCHES = ('grid', 'golden')
MAX_SHIFTS = 64
CANDIDATE_CHUNK_ELEMENTS = 1 << 22   # cross-entropy: tensor elements per vmapped chunk
MSE_BLOCK_ELEMENTS = 1 << 16        # mse: candidates x slices x elements of one error block
MSE_TILE = 256                      # mse: smallest tile of a slice's elements
_INVPHI = (math.sqrt(5.0) - 1.0) / 2.0


def init_state(shape=()) -> dict:
  """Zero ranges of the given shape and a batch count of 0."""
  return {'x_min': jnp.zeros(shape, jnp.float32), 'x_max': jnp.zeros(shape, jnp.float32),
          'n': jnp.zeros((), jnp.int32)}


# ----------------------------------------------------------------------------------------
# Helpers (pure; usable on their own)
# ----------------------------------------------------------------------------------------

def normalize_axes(reduce_axes, ndim: int) -> tuple[int, ...]:
  """None -> all axes; else sorted, unique, non-negative axes (ValueError if out of range)."""
  if reduce_axes is None:
    return tuple(range(ndim))
  if isinstance(reduce_axes, (int, np.integer)):
    reduce_axes = (reduce_axes,)
  out = set()
  for a in reduce_axes:
    if not -ndim <= int(a) < ndim:
      raise ValueError(f'reduce axis {a} out of range for a {ndim}-d tensor')
    out.add(int(a) % ndim)
  return tuple(sorted(out))


def compact_mask(mask, shape):
  """Bool mask with len(shape) axes, each of size 1 or shape's (not broadcast to `shape`).

  Broadcasting: numpy's rules, or a prefix of shape gets trailing axes. Keeping the size-1 axes lets reductions over them run on x alone.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask).astype(bool)
  shape = tuple(shape)
  if mask.ndim < len(shape) and tuple(mask.shape) == shape[:mask.ndim]:
    mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
  elif mask.ndim < len(shape):
    mask = mask.reshape((1,) * (len(shape) - mask.ndim) + mask.shape)
  if mask.ndim != len(shape) or any(m not in (1, d) for m, d in zip(mask.shape, shape)):
    raise ValueError(f'mask of shape {mask.shape} does not broadcast to {shape}')
  return mask


def masked_min_max(x, mask, reduce_axes):
  """(min, max, any_valid) over reduce_axes ignoring masked-out entries (float32).

  mask: None or a bool array broadcastable to x's shape (see `compact_mask`). Reduced axes
  along which the mask is constant (size 1, e.g. the hidden axis under a token mask) are
  reduced on x first, so no masked copy of x is formed.
  """
  x = jnp.asarray(x, jnp.float32)
  kept = tuple(d for i, d in enumerate(x.shape) if i not in reduce_axes)
  if mask is None:
    return (jnp.min(x, axis=reduce_axes), jnp.max(x, axis=reduce_axes),
            jnp.ones(kept, bool))
  mask = compact_mask(mask, x.shape)
  pre = tuple(a for a in reduce_axes if mask.shape[a] == 1 and x.shape[a] > 1)
  if 0 in x.shape:
    pre, mask = (), jnp.broadcast_to(mask, x.shape)
  x_lo = jnp.min(x, axis=pre, keepdims=True) if pre else x
  x_hi = jnp.max(x, axis=pre, keepdims=True) if pre else x
  mn = jnp.min(jnp.where(mask, x_lo, jnp.inf), axis=reduce_axes)
  mx = jnp.max(jnp.where(mask, x_hi, -jnp.inf), axis=reduce_axes)
  any_valid = jnp.broadcast_to(jnp.any(mask, axis=reduce_axes), kept)
  return jnp.broadcast_to(mn, kept), jnp.broadcast_to(mx, kept), any_valid


def apply_momentum(old, new, n, momentum):
  """EMA (1 - m) * new + m * old; `new` itself when n == 0 (first batch initialises)."""
  ema = (1.0 - momentum) * new + momentum * old
  return jnp.where(n == 0, new, ema)


def _to_rows(x, reduce_axes):
  """(x with kept axes first, flattened to (K, N)), kept shape."""
  kept = [a for a in range(x.ndim) if a not in reduce_axes]
  kept_shape = tuple(x.shape[a] for a in kept)
  xt = jnp.transpose(x, kept + list(reduce_axes))
  k = int(np.prod(kept_shape)) if kept_shape else 1
  return xt.reshape(k, -1), kept_shape


def masked_percentiles(x, mask, reduce_axes, qs: Sequence):
  """Percentiles qs (0..100) over reduce_axes of the valid entries, numpy 'linear' method.

  Returns a list of arrays of x's shape without reduce_axes. Slices with no valid entry
  give non-finite values (callers guard them).
  """
  x = jnp.asarray(x, jnp.float32)
  rows, kept_shape = _to_rows(x, reduce_axes)
  if mask is None:
    srt = jnp.sort(rows, axis=-1)
    n_valid = jnp.full(rows.shape[:1], rows.shape[1], jnp.int32)
  else:
    mrows, _ = _to_rows(mask, reduce_axes)
    srt = jnp.sort(jnp.where(mrows, rows, jnp.inf), axis=-1)
    n_valid = jnp.sum(mrows, axis=-1, dtype=jnp.int32)
  last = jnp.maximum(n_valid - 1, 0)
  out = []
  for q in qs:
    pos = (jnp.asarray(q, jnp.float32) / 100.0) * last.astype(jnp.float32)
    lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, last)
    hi = jnp.minimum(lo + 1, last)
    frac = pos - lo.astype(jnp.float32)
    a = jnp.take_along_axis(srt, lo[:, None], axis=-1)[:, 0]
    b = jnp.take_along_axis(srt, hi[:, None], axis=-1)[:, 0]
    # b - a is finite (both valid entries) and 0 when lo == hi.
    out.append((a + (b - a) * frac).reshape(kept_shape))
  return out


# ----------------------------------------------------------------------------------------
# MSE / cross-entropy range search
# ----------------------------------------------------------------------------------------

def _num_shifts(n_bits: int) -> tuple[int, float]:
  """(S, stride): S shift candidates of `stride` grid steps for the 2-D search."""
  max_skew = max(2 ** n_bits // 4, 1)
  s = min(max_skew, MAX_SHIFTS)
  return s, max_skew / s


def grid_candidates(mn, mx, one_sided, *, n_bits, symmetric, num_candidates, margin):
  """Candidate ranges (lo, hi), each of shape (M, K), in search order (module docstring).

  mn, mx: (K,) per-slice min / max; one_sided: (K,) bool. For an asymmetric quantizer the
  num_candidates 1-D candidates come first (they serve the one-sided slices), then the 2-D
  ones (the two-sided slices); `search_range` masks the other set out per slice.
  """
  n = num_candidates
  k = jnp.arange(1, n + 1, dtype=jnp.float32)[:, None]              # (N, 1)
  r1 = jnp.maximum(jnp.abs(mn), mx) + margin                          # (K,)
  t = true_divide(r1, n)[None, :] * k                                # (N, K)
  lo1 = jnp.where(one_sided[None, :], 0.0, -t)
  if symmetric:
    return lo1, t
  pos_lim = mx + margin
  neg_lim = mn - margin
  r2 = jnp.maximum(jnp.abs(pos_lim), jnp.abs(neg_lim))
  step = true_divide(r2, n)                                            # (K,)
  s, stride = _num_shifts(n_bits)
  j = jnp.arange(s, dtype=jnp.float32) * stride                        # (S,)
  sign = jnp.array([1.0, -1.0], jnp.float32)                           # (2,)
  half = step[None, :] * k                                             # (N, K)
  delta = true_divide(2.0 * half, 2.0 ** n_bits - 1)                  # (N, K)
  skew = (sign[None, :, None] * j[:, None, None])[None] * delta[:, None, None, :]  # (N,S,2,K)
  lo2 = jnp.maximum(-half[:, None, None, :] + skew, neg_lim)
  hi2 = jnp.minimum(half[:, None, None, :] + skew, pos_lim)
  kk = mn.shape[0]
  lo2 = lo2.reshape(-1, kk)
  hi2 = hi2.reshape(-1, kk)
  return jnp.concatenate([lo1, lo2], 0), jnp.concatenate([t, hi2], 0)


def grid_candidate(idx, mn, mx, one_sided, *, n_bits, symmetric, num_candidates, margin):
  """The grid candidates of flat indices idx (C,) (the order of `grid_candidates`): (lo, hi),
  each (C, K), computed with the same float operations (under jit XLA may fuse a product
  and a sum into one multiply-add, in either function: the values then agree to an ulp).

  Indices >= the number of candidates give finite values (callers mask them out).
  """
  n = num_candidates
  idx = jnp.asarray(idx, jnp.int32)
  k1 = (jnp.minimum(idx, n - 1) + 1).astype(jnp.float32)[:, None]     # (C, 1)
  r1 = jnp.maximum(jnp.abs(mn), mx) + margin
  t = true_divide(r1, n)[None, :] * k1
  lo1 = jnp.where(one_sided[None, :], 0.0, -t)
  if symmetric:
    return lo1, t
  s_, stride = _num_shifts(n_bits)
  m = jnp.clip(idx - n, 0, n * s_ * 2 - 1)
  k2 = (m // (s_ * 2) + 1).astype(jnp.float32)[:, None]
  j = ((m // 2) % s_).astype(jnp.float32) * stride
  sign = jnp.where(m % 2 == 0, 1.0, -1.0).astype(jnp.float32)
  pos_lim = mx + margin
  neg_lim = mn - margin
  r2 = jnp.maximum(jnp.abs(pos_lim), jnp.abs(neg_lim))
  step = true_divide(r2, n)
  half = step[None, :] * k2                                            # (C, K)
  delta = true_divide(2.0 * half, 2.0 ** n_bits - 1)
  skew = (sign * j)[:, None] * delta
  lo2 = jnp.maximum(-half + skew, neg_lim)
  hi2 = jnp.minimum(half + skew, pos_lim)
  is_1d = (idx < n)[:, None]
  return jnp.where(is_1d, lo1, lo2), jnp.where(is_1d, t, hi2)


def _grid_search(losses_for, chunk, mn, mx, one_sided, *, n_bits, symmetric, num_candidates,
                 margin):
  """The grid's first best candidate per slice, evaluated in chunks of `chunk` candidates
  with a running (strict) minimum, so no (candidates x slices) array is ever formed."""
  n = num_candidates
  total = n if symmetric else n + n * _num_shifts(n_bits)[0] * 2
  chunk = int(max(1, min(chunk, total)))
  n_chunks = -(-total // chunk)
  f = losses_for(chunk)
  kw = dict(n_bits=n_bits, symmetric=symmetric, num_candidates=n, margin=margin)

  def body(carry, i):
    best, blo, bhi = carry
    idx = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
    lo, hi = grid_candidate(idx, mn, mx, one_sided, **kw)
    losses = f(lo, hi)                                                 # (chunk, K)
    usable = (idx < total)[:, None]
    if not symmetric:   # 1-D candidates for one-sided slices, 2-D ones for the others
      is_1d = (idx < n)[:, None]
      usable = usable & jnp.where(one_sided[None, :], is_1d, ~is_1d)
    losses = jnp.where(usable & ~jnp.isnan(losses), losses, jnp.inf)
    a = jnp.argmin(losses, axis=0)                                     # first minimum
    pick = lambda c: jnp.take_along_axis(c, a[None, :], axis=0)[0]
    cmin = pick(losses)
    better = cmin < best
    return (jnp.where(better, cmin, best), jnp.where(better, pick(lo), blo),
            jnp.where(better, pick(hi), bhi)), None

  lo0, hi0 = grid_candidate(jnp.zeros((1,), jnp.int32), mn, mx, one_sided, **kw)
  init = (jnp.full(mn.shape, jnp.inf, jnp.float32), lo0[0], hi0[0])
  (_, lo, hi), _ = jax.lax.scan(body, init, jnp.arange(n_chunks, dtype=jnp.int32))
  return lo, hi


def _golden(f, a, b, iters: int):
  """Vectorised golden-section minimisation on [a, b], independently per element.

  f maps points (K,) to (losses (K,), aux); aux (any pytree of (K, ...) arrays) is carried
  along so the caller gets it at the minimiser. The loop's first two steps evaluate the two
  starting points, so f is traced once (nested searches stay small to compile). Returns
  (argmin, min, aux) over the last bracket's two interior points.
  """
  g = jnp.float32(_INVPHI)
  c = b - g * (b - a)
  d = a + g * (b - a)
  inf = jnp.full_like(c, jnp.inf)
  aux0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(f, c)[1])

  def pick(pred, u, v):    # where(pred, u, v) with pred (K,) or scalar, u / v (K, ...)
    pred = jnp.asarray(pred)
    if pred.ndim:
      pred = pred.reshape(pred.shape + (1,) * (u.ndim - pred.ndim))
    return jnp.where(pred, u, v)

  def body(i, carry):
    a, b, c, d, fc, fd, ac, ad = carry
    step = i >= 2
    left = fc < fd                          # the minimum is in [a, d]
    a2 = jnp.where(step & ~left, c, a)
    b2 = jnp.where(step & left, d, b)
    golden_new = jnp.where(left, b2 - g * (b2 - a2), a2 + g * (b2 - a2))
    new = jnp.where(i == 0, c, jnp.where(i == 1, d, golden_new))
    fn, an = f(new)
    tree_pick = lambda pred, u, v: jax.tree.map(lambda x, y: pick(pred, x, y), u, v)
    # Step: if left, (c, d) <- (new, c), else (c, d) <- (d, new).
    c2 = jnp.where(step, jnp.where(left, new, d), c)
    fc2 = jnp.where(i == 0, fn, jnp.where(step, jnp.where(left, fn, fd), fc))
    ac2 = tree_pick(i == 0, an, tree_pick(step, tree_pick(left, an, ad), ac))
    d2 = jnp.where(step, jnp.where(left, c, new), d)
    fd2 = jnp.where(i == 1, fn, jnp.where(step, jnp.where(left, fc, fn), fd))
    ad2 = tree_pick(i == 1, an, tree_pick(step, tree_pick(left, ac, an), ad))
    return a2, b2, c2, d2, fc2, fd2, ac2, ad2

  init = (a, b, c, d, inf, inf, aux0, aux0)
  a, b, c, d, fc, fd, ac, ad = jax.lax.fori_loop(0, iters + 2, body, init)
  best_c = fc <= fd
  return jnp.where(best_c, c, d), jnp.where(best_c, fc, fd), jax.tree.map(
      lambda u, v: pick(best_c, u, v), ac, ad)


def search_range(losses_for, mn, mx, one_sided, *, n_bits, symmetric, mse_search='grid',
                 num_candidates=100, margin=0.5, golden_iters=40, chunk=1):
  """Per-slice range (lo, hi), each (K,), minimising the loss of each slice.

  losses_for(C) -> f with f(lo, hi) -> losses, all (C, K): the losses of C candidate ranges
  per slice (called at trace time, outside the search's loops, so it can lay out its data
  once). chunk: candidates the grid evaluates per step.
  """
  if mse_search == 'grid':
    return _grid_search(losses_for, chunk, mn, mx, one_sided, n_bits=n_bits,
                        symmetric=symmetric, num_candidates=num_candidates, margin=margin)

  if mse_search != 'golden':
    raise ValueError(f'mse_search must be one of {MSE_SEARCHES}, got {mse_search!r}')

  f1 = losses_for(1)
  loss_fn = lambda lo, hi: f1(lo[None], hi[None])[0]
  r1 = jnp.maximum(jnp.abs(mn), mx) + margin
  sym_loss = lambda t: (loss_fn(jnp.where(one_sided, 0.0, -t), t), ())
  t, _, _ = _golden(sym_loss, 0.01 * r1, r1, golden_iters)
  lo1, hi1 = jnp.where(one_sided, 0.0, -t), t
  if symmetric:
    return lo1, hi1

  r2 = jnp.maximum(jnp.abs(mx + margin), jnp.abs(mn - margin))
  max_skew = float(max(2 ** n_bits // 4, 1))

  def range_loss(r):   # the best shift for half-width r: (its loss, the shift)
    m = 2.0 * r / (2.0 ** n_bits - 1) * max_skew
    shift, loss, _ = _golden(lambda sh: (loss_fn(-r + sh, r + sh), ()), -m, m, golden_iters)
    return loss, shift

  r, _, shift = _golden(range_loss, 0.01 * r2, r2, golden_iters)
  lo2, hi2 = -r + shift, r + shift
  return jnp.where(one_sided, lo1, lo2), jnp.where(one_sided, hi1, hi2)


def _mse_losses_for(rows, wrows, n_bits, symmetric):
  """losses_for(C) of the sum of squared quantization errors over each slice's valid entries.

  rows (K, N): the slices' values; wrows: their validity (None: all valid). Invalid entries
  are set to 0, which every candidate quantizes exactly to 0 (the zero-point is on the grid),
  so they add nothing. The (C, K, N) errors are summed block by block: a scan over tiles of T
  elements accumulates (C, Kc, T) partial sums (about MSE_BLOCK_ELEMENTS, cache-resident)
  elementwise, for each group of Kc slices, so the tensor is read once per candidate chunk and
  no error array of the tensor's size is formed. The quantizer is `quantize_dequantize`'s
  arithmetic (same scale, zero-point, true division, rounding and clamping), the grid signed
  iff any slice's candidate minimum is negative, as it decides over all channels.
  """
  if wrows is not None:
    rows = jnp.where(wrows, rows, 0.0)
  k, n = rows.shape

  def losses_for(c):
    # Tiles of t elements, at least 8 per slice where slices are long enough: a single
    # tile would leave an elementwise block feeding a reduction, which XLA's CPU backend
    # splits into several materialised arrays.
    t = min(n, max(MSE_TILE, (MSE_BLOCK_ELEMENTS // c) // 128 * 128), max(32, -(-n // 8)))
    nt = -(-n // t)
    kc = min(k, max(1, MSE_BLOCK_ELEMENTS // (c * t)))
    nk = -(-k // kc)
    x = jnp.pad(rows, ((0, nk * kc - k), (0, nt * t - n)))
    x = x.reshape(nk, kc, nt, t).transpose(0, 2, 1, 3)                # (nk, nt, kc, t)

    def blocks(a, c, fill):     # (c, K) -> (nk, c, kc, 1)
      a = jnp.pad(a, ((0, 0), (0, nk * kc - k)), constant_values=fill)
      return a.reshape(c, nk, kc).transpose(1, 0, 2)[..., None]

    def evaluate(scale, zp, q_min: float, q_max: float):
      def per_group(args):
        xg, sg, zg = args                                               # (nt, kc, t), (c, kc, 1)

        def tile(acc, xt):
          xb = xt[None]
          r = jnp.round(true_divide(xb, sg))
          if symmetric:   # z = 0
            xi = jnp.clip(r, q_min, q_max)
          else:   # clamp(r + z, 0, q_max) - z, z an integer in [0, q_max]: exact
            xi = jnp.clip(r + zg, q_min, q_max) - zg
          return acc + jnp.square(sg * xi - xb), None
        acc, _ = jax.lax.scan(tile, jnp.zeros((c, kc, t), jnp.float32), xg)
        return jnp.sum(acc, axis=-1)                                    # (c, kc)

      out = jax.lax.map(per_group, (x, blocks(scale, c, 1.0), blocks(zp, c, 0.0)))
      return out.transpose(1, 0, 2).reshape(c, nk * kc)[:, :k]

    def f(lo, hi):
      if not symmetric:
        scale, zp, _, _ = scale_zero_point(lo, hi, n_bits, False)
        return evaluate(jnp.broadcast_to(scale, lo.shape), jnp.broadcast_to(zp, lo.shape),
                        *int_grid(n_bits, False))
      # One grid type for the chunk, signed iff a candidate minimum is negative: the
      # searches' symmetric candidates have all lo = -t < 0 or all lo = 0 (the one-sided
      # decision is the tensor's; t > 0 for margin >= 0), so this is each candidate's own
      # decision, taken over all channels as quantize_dequantize does. The grid's bounds
      # are compile-time constants in each branch (a traced bound slows the loop twofold).
      signed = jnp.any(lo < 0)
      scale, zp, _, _ = scale_zero_point(lo, hi, n_bits, True, x_neg=signed)
      scale = jnp.broadcast_to(scale, lo.shape)
      zp = jnp.broadcast_to(zp, lo.shape)
      return jax.lax.cond(signed,
                          lambda: evaluate(scale, zp, *int_grid(n_bits, True, True)),
                          lambda: evaluate(scale, zp, *int_grid(n_bits, True, False)))
    return f
  return losses_for


def _mse_chunk(n):
  """Grid candidates per chunk of the mse search (one block row of MSE_TILE elements)."""
  return max(1, MSE_BLOCK_ELEMENTS // min(max(n, 1), MSE_TILE))


def _ce_loss_fn(x, target, row_mask, reduce_axes, kept_shape, n_bits, symmetric):
  """Candidate -> (K,) summed softmax cross-entropy of the quantized logits vs softmax(t)."""
  p = jax.nn.softmax(target, axis=-1)
  row_axes = tuple(a for a in reduce_axes if a != x.ndim - 1)   # batch axes of the CE map

  def loss(lo, hi):
    shape = list(x.shape)
    for a in reduce_axes:
      shape[a] = 1
    lo_b, hi_b = lo.reshape(shape), hi.reshape(shape)   # kept axes keep their order
    q = quantize_dequantize(x, n_bits, symmetric, lo_b, hi_b)
    ce = -jnp.sum(p * jax.nn.log_softmax(q, axis=-1), axis=-1)     # x.shape[:-1]
    if row_mask is not None:
      ce = jnp.where(row_mask, ce, 0.0)
    return jnp.sum(ce, axis=row_axes).reshape(-1)
  return loss


# ----------------------------------------------------------------------------------------
# update
# ----------------------------------------------------------------------------------------

_STATIC = ('kind', 'reduce_axes', 'n_bits', 'symmetric', 'mse_search', 'num_candidates',
           'golden_iters', 'signed')


@functools.partial(jax.jit, static_argnames=_STATIC)
def _update(state, x, mask, momentum, percentile, margin, logits_target, *, kind,
            reduce_axes, n_bits, symmetric, mse_search, num_candidates, golden_iters,
            signed=False):
  x = jax.lax.stop_gradient(x.astype(jnp.float32))     # ranges are statistics, not params
  if logits_target is not None:
    logits_target = jax.lax.stop_gradient(logits_target)
  cmask = compact_mask(mask, x.shape)
  mn, mx, valid = masked_min_max(x, cmask, reduce_axes)
  mask = None if cmask is None else jnp.broadcast_to(cmask, x.shape)
  n = state['n']
  old_min, old_max = state['x_min'], state['x_max']

  if kind == 'current_minmax':
    new_min, new_max = mn, mx
  elif kind == 'allminmax':
    new_min = jnp.where(n == 0, mn, jnp.minimum(old_min, mn))
    new_max = jnp.where(n == 0, mx, jnp.maximum(old_max, mx))
  elif kind == 'running_minmax':
    new_min = apply_momentum(old_min, mn, n, momentum)
    new_max = apply_momentum(old_max, mx, n, momentum)
  elif kind == 'percentile':
    p = jnp.asarray(percentile, jnp.float32)
    lo, hi = masked_percentiles(x, mask, reduce_axes, (100.0 - p, p))
    new_min = apply_momentum(old_min, lo, n, momentum)
    new_max = apply_momentum(old_max, hi, n, momentum)
  else:  # mse / cross_entropy
    mn0 = jnp.where(valid, mn, 0.0).reshape(-1)     # empty slices: any finite value
    mx0 = jnp.where(valid, mx, 0.0).reshape(-1)
    if symmetric and signed:   # always the signed grid: candidates [-t, t]
      one_sided = jnp.zeros(mn0.shape, bool)
    elif symmetric:   # one grid type for the whole quantizer
      one_sided = jnp.broadcast_to(jnp.all(mn0 >= 0), mn0.shape)
    else:
      one_sided = mn0 >= 0
    if kind == 'mse':
      rows, kept_shape = _to_rows(x, reduce_axes)
      wrows = None if mask is None else _to_rows(mask, reduce_axes)[0]
      losses_for = _mse_losses_for(rows, wrows, n_bits, symmetric)
      chunk = _mse_chunk(rows.shape[1])
    else:
      if x.ndim == 0 or (x.ndim - 1) not in reduce_axes:
        raise ValueError('cross_entropy range estimation needs the class axis (last) among '
                         f'reduce_axes, got reduce_axes={reduce_axes} for a {x.ndim}-d x')
      kept_shape = tuple(d for i, d in enumerate(x.shape) if i not in reduce_axes)
      target = x if logits_target is None else jnp.asarray(logits_target, jnp.float32)
      if target.shape != x.shape:
        raise ValueError(f'logits_target shape {target.shape} != x shape {x.shape}')
      row_mask = None if mask is None else jnp.all(mask, axis=-1)
      loss_fn = _ce_loss_fn(x, target, row_mask, reduce_axes, kept_shape, n_bits, symmetric)
      losses_for = lambda c: jax.vmap(loss_fn)
      chunk = max(1, CANDIDATE_CHUNK_ELEMENTS // max(int(x.size), 1))
    lo, hi = search_range(losses_for, mn0, mx0, one_sided, n_bits=n_bits, symmetric=symmetric,
                          mse_search=mse_search, num_candidates=num_candidates,
                          margin=margin, golden_iters=golden_iters, chunk=chunk)
    new_min = apply_momentum(old_min, lo.reshape(mn.shape), n, momentum)
    new_max = apply_momentum(old_max, hi.reshape(mx.shape), n, momentum)

  new_min = jnp.where(valid, new_min, old_min).astype(jnp.float32)
  new_max = jnp.where(valid, new_max, old_max).astype(jnp.float32)
  # A batch without a single valid entry is not seen: the state (count included) stays, so
  # the next valid batch initialises instead of blending with the zero initial state.
  seen = jnp.any(valid).astype(jnp.int32)
  return {'x_min': new_min, 'x_max': new_max, 'n': (n + seen).astype(jnp.int32)}


def update(kind: str, state: dict, x, *, mask=None, reduce_axes=None, momentum=0.9,
           percentile=99.999, n_bits=8, symmetric=False, mse_search='grid',
           num_candidates=100, margin=0.5, logits_target=None, golden_iters=40,
           signed=None) -> dict:
  """One estimator step: the new state {'x_min', 'x_max', 'n'} after seeing batch x.

  Args:
    kind: one of ESTIMATORS (static).
    state: from `init_state(S)`, S = x.shape without reduce_axes.
    x: the tensor (any float dtype; statistics in float32).
    mask: bool, True = entry counts (see module docstring for broadcasting). None: all count.
    reduce_axes: axes reduced (None: all -> per-tensor scalars). Static.
    momentum: EMA momentum of running_minmax / percentile / mse / cross_entropy.
    percentile: p in (50, 100]; the (100 - p, p) percentiles are taken.
    n_bits, symmetric: the quantizer the mse / cross_entropy search optimises for (static).
    mse_search: 'grid' or 'golden' (static); num_candidates: grid size (static);
    margin: absolute search margin (>= 0); golden_iters: golden-section iterations (static).
    logits_target: cross_entropy only, FP logits whose softmax is the target (default x).
    signed: symmetric mse / cross_entropy only: True searches for the signed grid whatever
      the data's sign (quantizers' x_neg=True, quant.symmetric_signed); None: signed iff the
      tensor has a negative value.
  """
  if kind not in ESTIMATORS:
    raise ValueError(f'estimator kind must be one of {ESTIMATORS}, got {kind!r}')
  if mse_search not in MSE_SEARCHES:
    raise ValueError(f'mse_search must be one of {MSE_SEARCHES}, got {mse_search!r}')
  n_bits = check_bits(n_bits)
  x = jnp.asarray(x)
  axes = normalize_axes(reduce_axes, x.ndim)
  out_shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
  for key in ('x_min', 'x_max'):
    if tuple(jnp.shape(state[key])) != out_shape:
      raise ValueError(f"state['{key}'] has shape {tuple(jnp.shape(state[key]))} but x of "
                       f'shape {x.shape} reduced over {axes} gives {out_shape}')
  if int(num_candidates) < 1:
    raise ValueError(f'num_candidates must be >= 1, got {num_candidates}')
  if isinstance(margin, (int, float, np.number)) and margin < 0:
    raise ValueError(f'margin must be >= 0, got {margin}')
  return _update(state, x, mask, momentum, percentile, margin, logits_target, kind=kind,
                 reduce_axes=axes, n_bits=n_bits, symmetric=bool(symmetric),
                 mse_search=mse_search, num_candidates=int(num_candidates),
                 golden_iters=int(golden_iters), signed=bool(signed))
