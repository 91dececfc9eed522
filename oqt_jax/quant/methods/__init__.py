"""Quantization methods, one module each, composable over (model, variables[, batches, qcfg]).

  lsq           LSQ / LSQ+ learnable-range quantizers (QAT, Token-Wise Clipping's fine stage)

A transform that keeps the floating-point function returns (model, variables); a method
that quantizes returns (qmodel, qvariables) that run with `qmodel.apply` like any
calibrated model.
"""

from oqt_jax.quant.methods.llm_int8 import METHODS as INT8_METHODS  # noqa: E402
METHODS = {**globals().get('METHODS', {}), **INT8_METHODS}   # registry += llm_int8, weight_only
