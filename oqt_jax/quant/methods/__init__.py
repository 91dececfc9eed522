"""Quantization methods, one module each, composable over (model, variables[, batches, qcfg]).

  lsq           LSQ / LSQ+ learnable-range quantizers (QAT, Token-Wise Clipping's fine stage)
  adaround      AdaRound: learned rounding of 4-bit weights, layer by layer (quant.adaround)
  qat           quantization-aware training: the range state in the train state (train.py)

A transform that keeps the floating-point function returns (model, variables); a method
that quantizes returns (qmodel, qvariables) that run with `qmodel.apply` like any
calibrated model.
"""
