"""Real int8 matmuls for the Dense layers through AQT (aqtp) — the only module importing AQT.

With `config.quant.int8 = True` every Dense layer whose weight is quantized to <= 8 bits runs
its matmul as int8 x int8 -> int32 (`lax.dot_general(..., preferred_element_type=int32)` on
int8 operands, emitted by `aqt_flax.AqtDotGeneral`), then rescales to float:

  y = (round(clip(x / s_x, -127, 127)) @ round(W_q / s_w)) * s_x * s_w

- the weight W_q is the fake-quantized kernel (symmetric, per tensor or per output channel);
  s_w is its quantizer's scale, so W_q / s_w are exactly its integer codes, on the same signed
  8-bit grid [-128, 127] as the fake-quant path (weights clipped below the range keep the
  code -128: nothing re-clips them to -127);
- the input x is re-gridded onto a symmetric int8 grid with a *static* scale
  s_x = max(|x_min|, |x_max|) / 127 from the range of the Dense input calibrated with the
  activation estimator (padding masked) during `quant.calibrate` ('in_<point>' state). The
  asymmetric upstream activation grid has a zero-point that int8 kernels without zero-point
  support cannot take, hence this symmetric re-grid: the int8 path agrees with the fake-quant
  path to within about one input step, not bit for bit.
AQT is given pre-scaled operands and a ConstantCalibration whose scale is exactly 1, so its own
(dynamic absmax) calibration is not used: the ranges are oqt_jax's calibrated ones.
`int8_backend='fake'` runs the same arithmetic in float32 (bit-level reference for tests).

AQT is end of life upstream (Qwix replaces it): swapping the backend means rewriting only
`_aqt_dot` below.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from oqt_jax.quant import estimators, quantizers
from oqt_jax.quant.layout import COLLECTION, token_mask_for, weight_reduce_axes

INT8_MAX = 127.0


INT8_MIN = -128.0


@functools.lru_cache(maxsize=None)
def _aqt_config():
  import dataclasses
  from aqt.jax.v2 import config as aqt_config
  cfg = aqt_config.fully_quantized(fwd_bits=8, bwd_bits=8, use_stochastic_rounding=False)
  # Symmetric int8 numerics have a quantization bound of 127.5 (values clip to +-127):
  # a constant bound of 127.5 gives a scale of exactly 1 for pre-scaled operands.
  aqt_config.set_constant_calibration(cfg, bound=127.5)
  # The weight operand (rhs) already holds integer codes in [-128, 127] (the fake-quant grid):
  # round only, no clip, so -128 stays -128 as in the fake-quant path.
  rhs = cfg.fwd.dg_quantizer.rhs
  rhs.numerics = dataclasses.replace(rhs.numerics, clip=False)
  return cfg


def _aqt_dot(module, name, xi, wi, dims):
  from aqt.jax.v2.flax import aqt_flax
  dg = aqt_flax.AqtDotGeneral(_aqt_config(), prng_name=None, parent=module,
                              name=f'aqt_{name}')
  return dg(xi, wi, dims, None)


def _fake_dot(xi, wi, dims):
  xq = jnp.round(jnp.clip(xi, -INT8_MAX, INT8_MAX))
  wq = jnp.round(jnp.clip(wi, INT8_MIN, INT8_MAX))
  return jax.lax.dot_general(xq, wq, dims, precision=jax.lax.Precision.HIGHEST)


def uses_int8(hooks, name) -> bool:
  r = hooks.rules
  wspec = r.spec('w' + name)
  return (r.int8 and wspec.enabled and wspec.symmetric and wspec.n_bits <= 8
          and r.n_bits_act <= 8)


def input_estimator(rules) -> str:
  return 'running_minmax' if rules.ranges_acts == 'cross_entropy' else rules.ranges_acts


def dot_general(hooks, module, name, mask):
  """The hooks' dot_general for the Dense whose output point is `name` (None: float matmul)."""
  if not uses_int8(hooks, name):
    return None
  r = hooks.rules
  key, wname = f'in_{name}', f'w{name}'
  mode = hooks.mode
  est = input_estimator(r)

  def update(state, x):
    return estimators.update(est, state, x, mask=token_mask_for(x, mask), reduce_axes=None,
                             momentum=r.momentum, percentile=r.percentile, n_bits=8,
                             symmetric=True, mse_search=r.mse_search,
                             num_candidates=r.num_candidates)

  if mode == 'init':
    module.put_variable(COLLECTION, key, estimators.init_state(()))
    return None
  if mode == 'calibrating':
    def calibrating_dot(x, kernel, dims):
      module.put_variable(COLLECTION, key, update(module.get_variable(COLLECTION, key), x))
      return jax.lax.dot_general(x, kernel, dims)
    return calibrating_dot

  def int8_dot(x, kernel, dims):
    if mode == 'frozen':
      if not module.has_variable(COLLECTION, key):
        raise ValueError(f'int8 matmul of {name!r} has no calibrated input range: run '
                         'oqt_jax.quant.calibrate with quant.int8=True')
      st = module.get_variable(COLLECTION, key)
    else:   # dynamic
      st = update(estimators.init_state(()), x)
    absmax = jnp.maximum(jnp.abs(st['x_min']), jnp.abs(st['x_max']))
    s_x = jnp.maximum(absmax / INT8_MAX, quantizers.EPS)
    if module.has_variable(COLLECTION, wname):
      wst = module.get_variable(COLLECTION, wname)
      axes = weight_reduce_axes(wname, kernel, r.per_channel)
    else:
      wst, axes = hooks.weight_state(wname, kernel)
    wspec = r.spec(wname)
    w_min, w_max = (quantizers.expand_range(wst[k], kernel.ndim, axes) for k in ('x_min', 'x_max'))
    s_w = quantizers.scale_zero_point(w_min, w_max, wspec.n_bits, True)[0]
    xi = x.astype(jnp.float32) / s_x
    wi = kernel.astype(jnp.float32) / s_w
    if hooks.int8_backend == 'aqt':
      y = _aqt_dot(module, name, xi, wi, dims)
    else:
      y = _fake_dot(xi, wi, dims)
    s_out = s_x * jnp.reshape(s_w, (-1,)) if s_w.size > 1 else s_x * s_w
    return (y.astype(jnp.float32) * s_out).astype(x.dtype)
  return int8_dot
