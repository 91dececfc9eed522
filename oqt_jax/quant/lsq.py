"""LSQ and LSQ+ quantizers: learned step size (and learned zero-point).

LSQ (Esser et al., 2020), b bits, integer grid [q_min, q_max]:
  s_g   = gradient_scale(s, g)              g = 1 / sqrt(numel * q_max)
  q(x)  = s_g * round_ste(clamp(x / s_g, q_min, q_max))

LSQ+ (Bhalgat et al., 2020; the fine stage of Outlier Suppression's Token-Wise Clipping):
a float zero-point z is learned with the scale; it is rounded with the STE and clamped to the
grid before use:
  s_g, z_g = gradient_scale(s, g), gradient_scale(z, g)
  z_r   = clamp(round_ste(z_g), q_min, q_max)
  q(x)  = (clamp(round_ste(x / s_g + z_r), q_min, q_max) - z_r) * s_g

`gradient_scale(v, g)` is v in the forward pass and multiplies v's gradient by g (a custom
VJP, so the forward value is v bit for bit; the originals' `(v - v*g).detach() + v*g` can be
an ulp off). The
per-tensor g uses numel = x.size; per channel numel / C (`grad_factor(x, q_max, channels)`).
Arithmetic is float32; the output has x's dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from oqt_jax.quant.quantizers import clamp, int_grid, round_ste, true_divide


@jax.custom_vjp
def _scaled_identity(v, g):
  return v


def _scaled_identity_fwd(v, g):
  return v, g


def _scaled_identity_bwd(g, ct):
  return ct * g, jnp.zeros_like(g)


_scaled_identity.defvjp(_scaled_identity_fwd, _scaled_identity_bwd)


def gradient_scale(v, g):
  """v in the forward pass (exactly: no v - v*g + v*g rounding); d/dv of anything downstream
  is multiplied by g."""
  v = jnp.asarray(v, jnp.float32)
  return _scaled_identity(v, jnp.asarray(g, jnp.float32))


def grad_factor(x, q_max: float, channels: int = 1) -> float:
  """LSQ's gradient scale 1 / sqrt(numel * q_max), numel counted per channel."""
  numel = max(int(x.size) // max(int(channels), 1), 1)
  return 1.0 / math.sqrt(numel * max(float(q_max), 1.0))


def lsq_quantize(x, scale, n_bits: int, *, symmetric: bool = True, signed: bool = True,
                 g=None):
  """LSQ fake quantization with a learnable `scale` (broadcasts against x).

  g: the gradient scale; None = 1 / sqrt(x.size * q_max) (per tensor). Pass
  grad_factor(x, q_max, C) for per-channel scales.
  """
  q_min, q_max = int_grid(n_bits, symmetric, signed)
  if g is None:
    g = grad_factor(x, q_max)
  s = gradient_scale(scale, g)
  xf = jnp.asarray(x, jnp.float32)
  out = round_ste(clamp(xf / s, q_min, q_max)) * s
  return out.astype(x.dtype)


def lsq_plus_quantize(x, scale, zero_point, n_bits: int, *, g=None):
  """LSQ+ fake quantization (asymmetric grid [0, 2^b - 1]) with learnable scale and float
  zero-point (both broadcast against x)."""
  q_min, q_max = int_grid(n_bits, symmetric=False)
  if g is None:
    g = grad_factor(x, q_max)
  s = gradient_scale(scale, g)
  z = clamp(round_ste(gradient_scale(zero_point, g)), q_min, q_max)
  xf = jnp.asarray(x, jnp.float32)
  out = (clamp(round_ste(xf / s + z), q_min, q_max) - z) * s
  return out.astype(x.dtype)


def lsq_affine_quantize(x, scale, zero_point, q_min, q_max, g):
  """The LSQ+ formula on a given integer grid [q_min, q_max] (arrays allowed, e.g. a
  symmetric signed or unsigned grid chosen at calibration): the zero-point is rounded with
  the STE and clamped to the grid; scale and zero-point gradients are multiplied by g
  (stop the zero-point's gradient for plain LSQ)."""
  s = gradient_scale(scale, g)
  z = clamp(round_ste(gradient_scale(zero_point, g)), q_min, q_max)
  xf = jnp.asarray(x, jnp.float32)
  # true division (quantizers.true_divide): the same integers as the calibrated quantizer
  out = (clamp(round_ste(true_divide(xf, s) + z), q_min, q_max) - z) * s
  return out.astype(x.dtype)


def init_from_range(x_min, x_max, n_bits: int, symmetric: bool):
  """(scale, zero_point) that reproduce the range [x_min, x_max] (the calibration result) as
  starting values of LSQ / LSQ+: the same widening to contain 0 as the uniform quantizers;
  the zero-point is kept as a float (LSQ+ rounds it in the forward pass)."""
  x_min = jnp.minimum(jnp.asarray(x_min, jnp.float32), 0.0)
  x_max = jnp.maximum(jnp.asarray(x_max, jnp.float32), 1e-8)
  if symmetric:
    _, q_max = int_grid(n_bits, True, True)
    scale = jnp.maximum(jnp.maximum(-x_min, x_max) / q_max, 1e-8)
    return scale, jnp.zeros_like(scale)
  _, q_max = int_grid(n_bits, False)
  scale = jnp.maximum((x_max - x_min) / q_max, 1e-8)
  return scale, -x_min / scale
