"""LLM.int8(): vector-wise int8 matmuls with the outlier hidden dims in floating point.

  y = llm_int8_matmul(x, w, threshold=6.0)          # x (..., d_in), w (d_in, d_out)

With X the (tokens, d_in) flattening of x:
  1. outlier dims  O = {j : any_t |X[t, j]| >= threshold}   (padding tokens excluded with
     `mask`); a data-dependent set, so it is a (d_in,) boolean mask, not a gather: the shapes
     never change and the function jit-compiles once;
  2. FP part      Y_fp = X[:, O] @ W[O, :]   (computed as (X * 1_O) @ W in float32);
  3. int8 part    X_r = X with the O columns zeroed;
                  s_x[t] = 127 / max_j |X_r[t, j]|   (one scale per row of X: per token)
                  s_w[o] = 127 / max_i |W[i, o]|     (one scale per column of W: per output)
                  Y_int = round(s_x X_r) @ round(s_w W)  as int8 x int8 -> int32
                  (`lax.dot_general(..., preferred_element_type=int32)` on int8 operands);
                  rows of the int8 W at O meet zeros of X_r, so only the non-outlier dims count;
  4. y = Y_fp + Y_int / (s_x s_w^T).
threshold = inf: no outlier dims, plain vector-wise absmax int8. A row or column of zeros gets
scale 1 (its int8 codes are 0).

Models: `LLMInt8Hooks(threshold)` is a hooks object (see models/layers.py) whose
`dot_general` runs every Dense layer (every Linear: Q/K/V, attention output, both FFN layers,
the heads' Dense layers; the tied LM decoder is an embedding product and stays FP) through
llm_int8_matmul; weights and activations are otherwise untouched. Each Dense sows the fraction
of its input dims that were outliers ('intermediates'/'llm_int8_outlier_fraction');
`outlier_fractions(qmodel, qvariables, batches)` averages them per layer over batches.
Registry entry: 'llm_int8' -> `llm_int8_method(model, variables, batches, qcfg)` (threshold
`qcfg.llm_int8_threshold`, default 6.0).
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from oqt_jax.quant import weight_int8

DEFAULT_THRESHOLD = 6.0
SOW_NAME = 'llm_int8_outlier_fraction'


def outlier_columns(x2, threshold, mask=None):
  """(d_in,) bool: the columns of the (tokens, d_in) x2 with any |x| >= threshold
  (rows with mask False ignored)."""
  big = jnp.abs(x2) >= threshold
  if mask is not None:
    big = big & mask.reshape(-1, 1).astype(bool)
  return jnp.any(big, axis=0)


def int8_vectorwise_matmul(x2, w):
  """round(s_x X) @ round(s_w W) in int8 x int8 -> int32, rescaled: absmax per row of the
  (tokens, d_in) X and per column of the (d_in, d_out) W."""
  x_q, s_x = weight_int8.absmax_quantize(x2, axis=1)        # (N, 1)
  w_q, s_w = weight_int8.absmax_quantize(w, axis=0)         # (1, d_out)
  y = jax.lax.dot_general(x_q, w_q, (((1,), (0,)), ((), ())),
                          preferred_element_type=jnp.int32)
  return y.astype(jnp.float32) / (s_x * s_w)


def llm_int8_matmul(x, w, threshold: float = DEFAULT_THRESHOLD, mask=None,
                    return_outliers: bool = False):
  """x @ w with LLM.int8()'s decomposition (module docstring).

  x: (..., d_in); w: (d_in, d_out); mask: optional token mask with x.shape[:-1] (padding
  tokens do not make a dim an outlier). Returns y (..., d_out) in x's dtype, and with
  return_outliers also the (d_in,) outlier mask.
  """
  d_in = x.shape[-1]
  x2 = jnp.asarray(x, jnp.float32).reshape(-1, d_in)
  wf = jnp.asarray(w, jnp.float32)
  m = None if mask is None else jnp.asarray(mask).reshape(-1)
  cols = outlier_columns(x2, threshold, m)
  x_fp = jnp.where(cols[None, :], x2, 0.0)
  x_int = jnp.where(cols[None, :], 0.0, x2)
  y = (jnp.dot(x_fp, wf, precision=jax.lax.Precision.HIGHEST)
       + int8_vectorwise_matmul(x_int, wf))
  y = y.reshape(x.shape[:-1] + (w.shape[-1],)).astype(x.dtype)
  return (y, cols) if return_outliers else y


# ---- the models' hooks --------------------------------------------------------------------------
def _token_mask(x, mask):
  if mask is None:
    return None
  if x.ndim == mask.ndim + 1 and tuple(x.shape[:-1]) == tuple(mask.shape):
    return mask
  return None


@dataclasses.dataclass(frozen=True)
class LLMInt8Hooks:
  """Runs every Dense layer through llm_int8_matmul; sows the outlier-dim fraction."""
  threshold: float = DEFAULT_THRESHOLD

  def weight(self, module, name, w):
    return w

  def act(self, module, name, x, mask):
    return x

  def dot_general(self, module, name, mask=None):
    def dot(x, kernel, dims):
      if tuple(map(tuple, dims[0])) != ((x.ndim - 1,), (0,)) or any(dims[1]) or kernel.ndim != 2:
        raise ValueError(f'llm_int8: Dense {name!r}: unsupported dot_general dims {dims}')
      y, cols = llm_int8_matmul(x, kernel, self.threshold, _token_mask(x, mask),
                                return_outliers=True)
      module.sow('intermediates', SOW_NAME, jnp.mean(cols.astype(jnp.float32)))
      return y
    return dot


def llm_int8(model, variables, threshold: float = DEFAULT_THRESHOLD):
  """(qmodel, variables): the model with every Dense layer as an LLM.int8() matmul."""
  if not threshold > 0:
    raise ValueError(f'llm_int8: threshold={threshold}: must be > 0')
  return model.clone(quant=LLMInt8Hooks(float(threshold))), variables


@functools.lru_cache(maxsize=8)
def _fractions_fn(model):
  from oqt_jax.quant.calibrate import MODEL_INPUTS

  def f(variables, batch):
    inputs = {k: batch[k] for k in MODEL_INPUTS[model.cfg.model_type] if k in batch}
    _, state = model.apply(variables, **inputs, mutable=['intermediates'])
    flat = jax.tree_util.tree_flatten_with_path(state['intermediates'])[0]
    out = {}
    for path, v in flat:
      keys = [k.key for k in path if hasattr(k, 'key')]
      if keys and keys[-1] == SOW_NAME:
        out['/'.join(keys[:-1])] = v
    return out
  return jax.jit(f)


def outlier_fractions(qmodel, qvariables, batches: Iterable) -> dict[str, float]:
  """{Dense layer path: fraction of its input dims that were outliers}, averaged over batches."""
  from oqt_jax.quant.calibrate import strip
  fn = _fractions_fn(qmodel)
  v = strip(qvariables)
  acc, n = None, 0
  for b in batches:
    b = {k: np.asarray(x) for k, x in b.items() if x is not None} if isinstance(b, dict) \
        else {'input_ids': np.asarray(b)}
    out = jax.device_get(fn(v, b))
    acc = out if acc is None else {k: acc[k] + out[k] for k in acc}
    n += 1
  if not n:
    return {}
  return {k: float(val) / n for k, val in sorted(acc.items())}


def format_fractions(fractions: dict[str, float]) -> str:
  lines = [f'LLM.int8() outlier dims per layer (fraction of input dims):']
  lines += [f'  {k:<48} {v:.4f}' for k, v in fractions.items()]
  if fractions:
    lines.append(f'  {"mean":<48} {float(np.mean(list(fractions.values()))):.4f}')
  return '\n'.join(lines)


def llm_int8_method(model, variables, batches=None, qcfg=None):
  """Registry entry 'llm_int8': threshold from qcfg.llm_int8_threshold; prints the outlier-dim
  fraction per layer measured on `batches` (when given)."""
  threshold = DEFAULT_THRESHOLD
  if qcfg is not None:
    q = qcfg.quant if 'quant' in qcfg else qcfg
    threshold = float(q.get('llm_int8_threshold', DEFAULT_THRESHOLD))
  qmodel, qvars = llm_int8(model, variables, threshold)
  if batches is not None:
    fr = outlier_fractions(qmodel, qvars, batches)
    if fr:
      print(format_fractions(fr), file=sys.stderr, flush=True)
  return qmodel, qvars


METHODS = {'llm_int8': llm_int8_method, 'weight_only': weight_int8.weight_only_method}
