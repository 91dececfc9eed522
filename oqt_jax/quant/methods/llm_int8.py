"""LLM.int8(): vector-wise int8 matmuls with the outlier hidden dims in floating point, computed
as bitsandbytes' Linear8bitLt does (MatMul8bitLt forward; the int8 ops of its default backend).

  y = llm_int8_matmul(x, w, threshold=6.0, bias=None)   # x (..., d_in), w (d_in, d_out)

Weights (bitsandbytes' Int8Params, `quantize_weight`): W cast to float16; per output channel
(a row of torch's W^T, a column of our (d_in, d_out) kernel) absmax_o = max_i |W16[i, o]| in
float32; codes CB = round(W16 * (127 / absmax_o)) as int8 (round half to even; 127 / absmax
evaluated as torch does, reciprocal then times 127). `llm_int8`
stores CB in 'params' (int8) and absmax in 'weight_scales' (float32, one per output channel).

Activations (int8_vectorwise_quant with a threshold), X the (tokens, d_in) flattening of x,
cast to float16 for this step (the threshold too, as torch compares a float16 tensor):
  1. outlier elements  E = |X16| >= threshold;  outlier columns O = {j : any_t E[t, j]}
     (a (d_in,) boolean mask, not a gather: shapes never change, one jit compile);
  2. row scale         absmax_t = max_j |X16[t, j]| over the row with only the ELEMENTS of E
                       zeroed (the other values in the O columns still count);
  3. codes             CA = round(X16 * (127 / absmax_t)) with E zeroed; then the O columns
                       zeroed in every row.
int8 part (int8_linear_matmul + int8_mm_dequant): C = CA @ CB as int8 x int8 -> int32
(`lax.dot_general(..., preferred_element_type=int32)`), then
  Y = C * (absmax_t absmax_o) * (1 / 127^2) + bias                           (float32)
with 1/127^2 = 6.200012e-05, the constant of bitsandbytes' CUDA kernel (its torch-native
default/CPU op multiplies by 6.200124e-05, 1.8e-5 relative larger; `dequant_const` selects it).
Outlier part (int8_mixed_scaled_mm): the O columns of X in x's own precision (not float16)
times the int8-DEQUANTIZED weight rows, W_dq = (CB * absmax_o) * float32(1/127):
  y = Y + X[:, O] @ W_dq[O, :].
threshold = inf: no outlier dims (plain vector-wise int8). A row or column whose absmax is 0
gets codes 0 and contributes 0 (bitsandbytes: 0 * (0 * inf) codes, scaled by 0).

Models: `llm_int8(model, variables, threshold, keep_head_fp=True)` converts every Dense layer
(Q/K/V, attention output, both FFN layers, OPT's project_in/out, BERT's pooler and MLM
transform) and runs it through `LLMInt8Hooks`. As the transformers integration
(`get_keys_to_not_convert`: the output embeddings and the last module stay floating point),
the classification head (BERT's 'classifier') and the tied LM decoder (OPT's lm_head, BERT's
MLM decoder: a product with the word-embedding table) stay FP by default. `keep_head_fp=False`
converts them too, as transformers does with llm_int8_skip_modules=[]: the classifier's kernel
becomes int8, and the tied decoder gets an int8 copy of the table's transpose ('weight_scales'
/<table path>/head_codes (d, vocab) and head_absmax (vocab,)) while the lookups keep the FP
table (models/layers.py: the optional `attend_dot` hook). Biases are added in float32 after the int8
part and the outlier part (bitsandbytes adds the bias inside the int8 dequantization: the same
sum, in another float32 order). Every token of the batch, padding included, takes part in
choosing the outlier columns, as in bitsandbytes (`ignore_padding=True`: padding tokens do not
make a dim an outlier). Each Dense sows the fraction of its input dims that were outliers
('intermediates'/'llm_int8_outlier_fraction'); `outlier_fractions(qmodel, qvariables, batches)`
averages them per layer over batches. `weight_int8.param_bytes(qvariables)` is the stored size.
Registry entry: 'llm_int8' -> `llm_int8_method(model, variables, batches, qcfg)` (threshold
`qcfg.llm_int8_threshold`, PRESET: the original's 6.0).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oqt_jax.quant import weight_int8
from oqt_jax.quant.calibrate import MODEL_INPUTS, strip

DEFAULT_THRESHOLD = 6.0
PRESET: dict = dict(llm_int8_threshold=DEFAULT_THRESHOLD)
SOW_NAME = 'llm_int8_outlier_fraction'
SCALE_NAME = 'absmax'                   # 'weight_scales'/<Dense path>/absmax: (d_out,) float32
HEAD_POINTS = ('C',)                    # the classification head's Dense (BERT 'classifier')
TIED_HEAD_POINT = 'wM'                  # the tied LM decoder's weight point (OPT, BERT MLM)
HEAD_CODES, HEAD_ABSMAX = 'head_codes', 'head_absmax'   # its int8 copy (keep_head_fp=False)
MM_DEQUANT_CONST = float(np.float32(1.0 / (127.0 * 127.0)))    # CUDA kernel: 6.200012e-05
DEFAULT_OP_DEQUANT_CONST = 6.200124e-05                       # torch-native default/CPU op
INV_127 = float(np.float32(1.0 / 127.0))                      # int8_vectorwise_dequant


def _safe_scale(amax, xp=jnp):
  """127 / absmax in float32, computed as torch evaluates `127.0 / tensor`: reciprocal(absmax)
  * 127 (two roundings; a direct division rounds a quarter of the scales differently, which
  moves codes sitting on a .5); 1 where absmax is 0 (the codes are 0 there)."""
  recip = xp.float32(1.0) / xp.where(amax > 0, amax, xp.float32(1.0))
  return xp.where(amax > 0, recip * xp.float32(127.0), xp.float32(1.0)).astype(xp.float32)


def quantize_weight(w):
  """(codes int8 (d_in, d_out), absmax float32 (d_out,)) of a (d_in, d_out) kernel, as
  bitsandbytes' Int8Params: float16 weights, absmax per output channel, round(W16 127/absmax).
  A numpy array is quantized in numpy (the same float32 operations), anything else in jax."""
  xp = np if isinstance(w, np.ndarray) else jnp
  w16 = xp.asarray(w).astype(xp.float16).astype(xp.float32)
  amax = xp.max(xp.abs(w16), axis=0)
  codes = xp.round(w16 * _safe_scale(amax, xp)[None, :]).astype(xp.int8)
  return codes, amax


def dequantize_weight(codes, amax):
  """(CB * absmax) * float32(1/127), float32 (bitsandbytes' int8_vectorwise_dequant)."""
  return (codes.astype(jnp.float32) * amax[None, :]) * jnp.float32(INV_127)


def quantize_rows(x2, threshold, mask=None):
  """(codes int8 (N, d_in), absmax float32 (N,), outlier columns bool (d_in,)) of the
  (N, d_in) X, as bitsandbytes' int8_vectorwise_quant (module docstring, steps 1-3); rows with
  mask False neither make a column an outlier nor have elements zeroed."""
  x16 = jnp.asarray(x2).astype(jnp.float16)
  big = jnp.abs(x16) >= jnp.float16(threshold)
  if mask is not None:
    big = big & mask.reshape(-1, 1).astype(bool)
  cols = jnp.any(big, axis=0)
  xz = jnp.where(big, 0.0, x16.astype(jnp.float32))
  amax = jnp.max(jnp.abs(xz), axis=1)
  codes = jnp.round(xz * _safe_scale(amax)[:, None]).astype(jnp.int8)
  codes = jnp.where(cols[None, :], jnp.int8(0), codes)
  return codes, amax, cols


def int8_mm_dequant(acc, amax_rows, amax_cols, bias=None, dequant_const=MM_DEQUANT_CONST):
  """acc (int32) * (absmax_t absmax_o) * const (+ bias), float32."""
  out = acc.astype(jnp.float32) * (amax_rows[:, None] * amax_cols[None, :]) \
      * jnp.float32(dequant_const)
  return out if bias is None else out + jnp.asarray(bias, jnp.float32)


def _int8_dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def llm_int8_matmul(x, w, threshold: float = DEFAULT_THRESHOLD, mask=None,
                    return_outliers: bool = False, *, bias=None, w_absmax=None,
                    dequant_const: float = MM_DEQUANT_CONST):
  """x @ w (+ bias) with LLM.int8()'s decomposition, as bitsandbytes (module docstring).

  x: (..., d_in); w: (d_in, d_out) floating point (quantized here as Int8Params does), or the
  int8 codes with `w_absmax` (d_out,); bias: (d_out,) added as bitsandbytes does (inside the
  int8 dequantization); mask: optional token mask with x.shape[:-1] (None, as bitsandbytes:
  every row counts for the outlier columns). Returns y (..., d_out) in x's dtype, and with
  return_outliers also the (d_in,) outlier-column mask.
  """
  d_in = x.shape[-1]
  x2 = jnp.asarray(x).reshape(-1, d_in)
  if jnp.asarray(w).dtype == jnp.int8:
    if w_absmax is None:
      raise ValueError('llm_int8_matmul: int8 weights need w_absmax')
    cw, aw = jnp.asarray(w), jnp.asarray(w_absmax, jnp.float32).reshape(-1)
  else:
    cw, aw = quantize_weight(w)
  m = None if mask is None else jnp.asarray(mask).reshape(-1)
  cx, ax, cols = quantize_rows(x2, threshold, m)
  y = int8_mm_dequant(_int8_dot(cx, cw), ax, aw, bias, dequant_const)
  x_out = jnp.where(cols[None, :], x2.astype(jnp.float32), 0.0)
  y = y + jnp.dot(x_out, dequantize_weight(cw, aw), precision=jax.lax.Precision.HIGHEST)
  y = y.reshape(x.shape[:-1] + (cw.shape[-1],)).astype(x.dtype)
  return (y, cols) if return_outliers else y


# ---- the models ---------------------------------------------------------------------------------
def _token_mask(x, mask):
  if mask is None:
    return None
  if x.ndim == mask.ndim + 1 and tuple(x.shape[:-1]) == tuple(mask.shape):
    return mask
  return None


@dataclasses.dataclass(frozen=True)
class LLMInt8Hooks:
  """Runs the converted Dense layers (int8 kernels in 'params', absmax in 'weight_scales')
  through llm_int8_matmul; sows the outlier-dim fraction. A Dense whose kernel is not int8
  (the head kept FP) runs in floating point."""
  threshold: float = DEFAULT_THRESHOLD
  keep_head_fp: bool = True
  ignore_padding: bool = False
  dequant_const: float = MM_DEQUANT_CONST

  def weight(self, module, name, w):
    return w

  def act(self, module, name, x, mask):
    return x

  def dot_general(self, module, name, mask=None):
    codes = module.get_variable('params', 'kernel')
    if codes is None or codes.dtype != jnp.int8:
      return None
    absmax = module.get_variable(weight_int8.SCALES, SCALE_NAME)

    def dot(x, kernel, dims):
      if tuple(map(tuple, dims[0])) != ((x.ndim - 1,), (0,)) or any(dims[1]) or kernel.ndim != 2:
        raise ValueError(f'llm_int8: Dense {name!r}: unsupported dot_general dims {dims}')
      m = _token_mask(x, mask) if self.ignore_padding else None
      y, cols = llm_int8_matmul(x, codes, self.threshold, m, return_outliers=True,
                                w_absmax=absmax, dequant_const=self.dequant_const)
      module.sow('intermediates', SOW_NAME, jnp.mean(cols.astype(jnp.float32)))
      return y
    return dot


  def attend_dot(self, module, wpoint):
    """The tied LM decoder (weight point 'wM') from its int8 copy, when converted."""
    if wpoint != TIED_HEAD_POINT or not module.has_variable(weight_int8.SCALES, HEAD_CODES):
      return None
    codes = module.get_variable(weight_int8.SCALES, HEAD_CODES)
    absmax = module.get_variable(weight_int8.SCALES, HEAD_ABSMAX)

    def head(x):
      y, cols = llm_int8_matmul(x, codes, self.threshold, return_outliers=True,
                                w_absmax=absmax, dequant_const=self.dequant_const)
      module.sow('intermediates', SOW_NAME, jnp.mean(cols.astype(jnp.float32)))
      return y
    return head


def converted_sites(model, variables, keep_head_fp: bool = True) -> list:
  """The Dense weight sites LLM.int8() converts (all but the classifier with keep_head_fp)."""
  head_w = {'w' + p for p in HEAD_POINTS}
  return [s for s in weight_int8.weight_sites(model, variables) if s.kind == 'dense'
          and not (keep_head_fp and head_w & set(s.points))]


def _tree(variables, name):
  v = variables.get(name, {})
  return flax.core.unfreeze(v) if isinstance(v, flax.core.FrozenDict) else dict(v)


def llm_int8(model, variables, threshold: float = DEFAULT_THRESHOLD, *,
             keep_head_fp: bool = True, ignore_padding: bool = False,
             dequant_const: float = MM_DEQUANT_CONST):
  """(qmodel, qvariables): every Dense layer as an LLM.int8() matmul, its kernel stored as int8
  codes in 'params' and its per-output-channel absmax (float32) in 'weight_scales'; without
  keep_head_fp the classifier and the tied LM decoder (an int8 copy of the table) too."""
  if not threshold > 0:
    raise ValueError(f'llm_int8: threshold={threshold}: must be > 0')
  flat = dict(traverse_util.flatten_dict(_tree(variables, 'params')))
  scales = dict(traverse_util.flatten_dict(_tree(variables, weight_int8.SCALES)))
  if not keep_head_fp:      # the tied decoder: an int8 copy (d, vocab) of the table's transpose
    for site in weight_int8.weight_sites(model, variables):
      if site.kind == 'embed' and TIED_HEAD_POINT in site.points:
        codes, amax = quantize_weight(np.asarray(jax.device_get(flat[site.path])).T)
        scales[site.path[:-1] + (HEAD_CODES,)] = jnp.asarray(codes)
        scales[site.path[:-1] + (HEAD_ABSMAX,)] = jnp.asarray(amax)
  for site in converted_sites(model, variables, keep_head_fp):
    w = flat[site.path]
    if np.dtype(w.dtype) == np.int8:
      raise ValueError(f'llm_int8: {"/".join(site.path)} is already int8')
    codes, amax = quantize_weight(np.asarray(jax.device_get(w)))
    flat[site.path] = jnp.asarray(codes)
    scales[site.path[:-1] + (SCALE_NAME,)] = jnp.asarray(amax)
  out = {k: v for k, v in dict(variables).items()
         if k not in ('params', weight_int8.SCALES, 'intermediates')}
  out['params'] = traverse_util.unflatten_dict(flat)
  out[weight_int8.SCALES] = traverse_util.unflatten_dict(scales)
  hooks = LLMInt8Hooks(float(threshold), bool(keep_head_fp), bool(ignore_padding),
                       float(dequant_const))
  return model.clone(quant=hooks), out


@functools.lru_cache(maxsize=8)
def _fractions_fn(model):

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
  lines = ['LLM.int8() outlier dims per layer (fraction of input dims):']
  lines += [f'  {k:<48} {v:.4f}' for k, v in fractions.items()]
  if fractions:
    lines.append(f'  {"mean":<48} {float(np.mean(list(fractions.values()))):.4f}')
  return '\n'.join(lines)


def llm_int8_method(model, variables, batches=None, qcfg=None, progress=False):
  """Registry entry 'llm_int8' (needs no data: batches unused): threshold from
  qcfg.llm_int8_threshold (PRESET: 6.0); optional qcfg fields llm_int8_keep_head_fp (True)
  and llm_int8_ignore_padding (False)."""
  del batches, progress
  q = {} if qcfg is None else (qcfg.quant if 'quant' in qcfg else qcfg)
  get = lambda k, d: q.get(k, d) if hasattr(q, 'get') else d
  return llm_int8(model, variables, float(get('llm_int8_threshold', DEFAULT_THRESHOLD)),
                  keep_head_fp=bool(get('llm_int8_keep_head_fp', True)),
                  ignore_padding=bool(get('llm_int8_ignore_padding', False)))
