"""The LSQ / LSQ+ quantizers live in oqt_jax.quant.lsq; this name stays importable."""
from oqt_jax.quant.lsq import (_scaled_identity, grad_factor, gradient_scale,  # noqa: F401
                               init_from_range, lsq_affine_quantize, lsq_plus_quantize,
                               lsq_quantize)
