"""Int8 weight quantization (absmax and zero-point) and the weight-only int8 mode of the models.

The two quantizers of the weight-quantization article, with its conventions (the scale is a
multiplier: X_q = round(s X), X_dq = X_q / s):

  absmax      s = 127 / max|X|                X_q = round(s X)                      (int8)
              X_dq = X_q / s
  zero-point  s = 255 / (max X - min X)       z = round(-s min X - 128)
              X_q = clip(round(s X + z), -128, 127)                                 (int8)
              X_dq = (X_q - z) / s

`axis` names the axis (or axes) REDUCED OVER, as in numpy's `max(axis=...)`: None = one scale
for the whole tensor (per tensor); `axis=-1` on a (tokens, d) activation = one scale per row
(token); `axis=0` on a (d_in, d_out) Dense kernel = one scale per column (output channel).
Scales and zero-points keep the reduced axes with size 1, so they broadcast against X.
A constant slice (max|X| = 0, or max X = min X) gets scale 1 instead of a division by 0 (the
article guards the zero range of zero-point quantization the same way).

Weight-only int8 (`config.quant.weight_only=True`, `weight_only(model, variables)`): every
Dense kernel and embedding table is stored as int8 in 'params' with one float32 absmax scale
per output channel (Dense: per column of the (in, out) kernel; tables: per row, i.e. per
token) in the 'weight_scales' collection; the model runs with `WeightOnlyHooks`, which
dequantize the weight when the layer reads it; activations stay floating point. Biases,
LayerNorm parameters and attention-gate parameters stay floating point.
`param_bytes(variables)` is the stored size; `model_bytes(...)` the nominal size of a model
whose weights are quantized to some bit width (for comparing methods).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

SCALES = 'weight_scales'     # collection of the int8 weights' scales
INT8_MIN, INT8_MAX = -128, 127


def _amax(a, axis):
  return jnp.max(a, axis=axis, keepdims=True)


def absmax_quantize(x, axis=None):
  """(X_q int8, scale): symmetric int8 with s = 127 / max|X| over `axis` (None: per tensor)."""
  xf = jnp.asarray(x, jnp.float32)
  amax = _amax(jnp.abs(xf), axis)
  scale = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 1.0)
  x_q = jnp.clip(jnp.round(scale * xf), -127, 127).astype(jnp.int8)
  return x_q, scale


def absmax_dequantize(x_q, scale):
  """X_q / s."""
  return jnp.asarray(x_q, jnp.float32) / scale


def zeropoint_quantize(x, axis=None):
  """(X_q int8, scale, zero_point): asymmetric int8 over [-128, 127], s = 255 / (max - min),
  z = round(-s min - 128), reduced over `axis` (None: per tensor)."""
  xf = jnp.asarray(x, jnp.float32)
  x_range = _amax(xf, axis) - (-_amax(-xf, axis))
  x_range = jnp.where(x_range == 0, 1.0, x_range)
  scale = 255.0 / x_range
  x_min = -_amax(-xf, axis)
  zero_point = jnp.round(-scale * x_min - 128.0)
  x_q = jnp.clip(jnp.round(scale * xf + zero_point), INT8_MIN, INT8_MAX).astype(jnp.int8)
  return x_q, scale, zero_point


def zeropoint_dequantize(x_q, scale, zero_point):
  """(X_q - z) / s."""
  return (jnp.asarray(x_q, jnp.float32) - zero_point) / scale


# ---- which parameters are weights ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WeightSite:
  """One parameter that goes through the models' weight hook."""
  path: tuple           # params path of the leaf, e.g. ('encoder_layer_0', 'attention', 'query', 'kernel')
  points: tuple         # the weight points reading it ('wq0'; a tied table: ('Et', 'wM'))
  kind: str             # 'dense' | 'embed' | 'layernorm'
  channel_axis: int     # the output-channel axis (Dense: 1, tables: 0, gamma: 0)


class _Probe:
  """Hooks that record every weight read (module path, point name) while tracing."""

  def __init__(self):
    self.seen = []

  def weight(self, module, name, w):
    self.seen.append((tuple(module.scope.path), type(module).__name__, name))
    return w

  def act(self, module, name, x, mask):
    return x

  def dot_general(self, module, name, mask=None):
    return None


KINDS = {'Dense': ('dense', 'kernel', 1), 'Embed': ('embed', 'embedding', 0),
         'LayerNorm': ('layernorm', 'scale', 0)}


def _dummy_inputs(model):
  ids = jnp.zeros((1, 4), jnp.int32)
  return dict(input_ids=ids, attention_mask=jnp.ones((1, 4), jnp.int32))


def weight_sites(model, variables) -> list[WeightSite]:
  """Every parameter the model reads through its weight hook (traced once, no compute)."""
  shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                  variables['params'])
  return list(_weight_sites(model.clone(quant=None), _Frozen(shapes)))


class _Frozen:
  """A hashable wrapper of a params shape tree (the cache key of _weight_sites)."""

  def __init__(self, tree):
    self.tree = tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    self._key = (treedef, tuple((l.shape, str(l.dtype)) for l in leaves))

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Frozen) and self._key == other._key


@functools.lru_cache(maxsize=16)
def _weight_sites(model, shapes: _Frozen) -> tuple[WeightSite, ...]:
  probe = _Probe()
  params = {'params': shapes.tree}
  jax.eval_shape(lambda v: model.clone(quant=probe).apply(v, **_dummy_inputs(model)), params)
  sites: dict[tuple, WeightSite] = {}
  for mpath, cls, point in probe.seen:
    if cls not in KINDS:
      continue
    kind, leaf, ch = KINDS[cls]
    path = mpath + (leaf,)
    if path in sites:
      s = sites[path]
      if point not in s.points:
        sites[path] = dataclasses.replace(s, points=s.points + (point,))
    else:
      sites[path] = WeightSite(path, (point,), kind, ch)
  return tuple(sites.values())


# ---- weight-only int8 --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WeightOnlyHooks:
  """Dequantizes int8 weights (params) with their scales ('weight_scales'); FP activations."""

  def weight(self, module, name, w):
    if w.dtype != jnp.int8:
      return w
    return absmax_dequantize(w, module.get_variable(SCALES, 'scale'))

  def act(self, module, name, x, mask):
    return x

  def dot_general(self, module, name, mask=None):
    return None


def _tree(variables, name):
  v = variables.get(name, {})
  return flax.core.unfreeze(v) if isinstance(v, flax.core.FrozenDict) else v


def weight_only(model, variables, *, kinds=('dense', 'embed')):
  """(qmodel, qvariables): int8 weights (absmax per output channel) stored in 'params', their
  float32 scales in 'weight_scales'; qmodel dequantizes them on use, activations in FP."""
  flat = dict(traverse_util.flatten_dict(_tree(variables, 'params')))
  scales = {}
  for site in weight_sites(model, variables):
    if site.kind not in kinds:
      continue
    w = flat[site.path]
    axes = tuple(a for a in range(w.ndim) if a != site.channel_axis)
    w_q, s = absmax_quantize(w, axis=axes)
    flat[site.path] = w_q
    scales[site.path[:-1] + ('scale',)] = s
  out = {k: v for k, v in dict(variables).items() if k not in ('params', SCALES, 'intermediates')}
  out['params'] = traverse_util.unflatten_dict(flat)
  out[SCALES] = traverse_util.unflatten_dict(scales)
  return model.clone(quant=WeightOnlyHooks()), out


def param_bytes(variables, collections=('params', SCALES)) -> int:
  """Bytes of the stored arrays of `collections`."""
  total = 0
  for c in collections:
    for leaf in jax.tree_util.tree_leaves(_tree(variables, c)):
      total += int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
  return total


def model_bytes(model, variables, bits_of: Optional[Callable] = None,
                per_channel: bool = True) -> int:
  """Nominal size of the model's parameters when its weights are stored at some bit width.

  bits_of(site) -> bits (<= 16: stored as integers of that width, packed, plus one float32
  scale per output channel, or per tensor without per_channel) or None (kept as stored).
  None: every parameter as stored (param_bytes of 'params').
  """
  flat = traverse_util.flatten_dict(_tree(variables, 'params'))
  bits = {}
  if bits_of is not None:
    for s in weight_sites(model, variables):
      b = bits_of(s)
      if b is not None and b < 32:
        bits[s.path] = (b, s.channel_axis)
  total = 0.0
  for path, leaf in flat.items():
    n = int(np.prod(np.shape(leaf)))
    if path in bits:
      b, ch = bits[path]
      n_scales = np.shape(leaf)[ch] if per_channel and np.ndim(leaf) > 1 else 1
      total += n * b / 8 + 4 * n_scales
    else:
      total += n * np.dtype(leaf.dtype).itemsize
  return int(np.ceil(total))
