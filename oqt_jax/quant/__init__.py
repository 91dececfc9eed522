"""Fake quantization of BERT / OPT (transformer-quantization, EMNLP 2021) and real int8 (AQT).

  from oqt_jax import quant
  x_q = quant.quantize_dequantize(x, n_bits=8, symmetric=False, x_min=-1., x_max=2.)
  qcfg = quant.config(n_bits=8, n_bits_act=8, quant_dict="{'h': 'ngp6'}")
  qmodel, qvariables = quant.calibrate(model, variables, batches, qcfg)
  qmodel, qvariables = quant.adaround(model, variables, batches, qcfg)   # AdaRound weights
  out = qmodel.apply(qvariables, input_ids, attention_mask=mask)
  quant.validate_quant_config(config)      # ConfigError 'quant.<field>=...: why'
  qcfg = quant.resolved(config)            # validated once: a read-only QuantConfig that
                                           # calibrate / the methods take without re-checking
  model, variables = quant.gamma_migration(model, variables)            # Outlier Suppression
  qmodel, qvariables = quant.token_wise_clipping(model, variables, batches, qcfg)
  model, variables = quant.smoothquant(model, variables, batches, alpha=0.5)

Modules, bottom up: quantizers (pure quantize-dequantize, STE, granularities), lsq (LSQ /
LSQ+ quantizers), estimators (range estimators), points (point names, quant_setup /
quant_dict rules, the quant config), layout (the 'quant' collection's name, weight channel
axes, token masks), int8 (int8 matmuls through AQT), hooks (QuantHooks: the models' hook
protocol over the 'quant' collection), calibrate (calibration flow), weight_int8, methods
(one module per method, and above them the registry eval.py dispatches on).
"""
from oqt_jax.quant.calibrate import calibrate, model_inputs, quant_ranges
from oqt_jax.quant.hooks import QuantHooks
from oqt_jax.quant.points import (QUANT_SETUPS, PointSpec, QuantConfig, Rules, config, describe,
                                  parse_quant_dict, resolved, validate_quant_config)
from oqt_jax.quant.quantizers import quantize_dequantize, scale_zero_point
from oqt_jax.quant.methods.outlier_suppression import gamma_migration, token_wise_clipping
from oqt_jax.quant.methods.smoothquant import smoothquant


from oqt_jax.quant.methods.adaround import adaround  # noqa: E402  (imports the modules above)


def hooks(qcfg, model_cfg, mode=None, **kw) -> QuantHooks:
  """QuantHooks for a quant config and a model config (mode: frozen, or dynamic if set)."""
  return QuantHooks.build(qcfg, model_cfg, mode=mode, **kw)


def rules(qcfg, model_cfg) -> Rules:
  """The resolved per-point rules; `rules(...).spec('h3')` tells how h3 is quantized."""
  return Rules.build(qcfg, model_cfg)


__all__ = ['QUANT_SETUPS', 'PointSpec', 'QuantConfig', 'QuantHooks', 'Rules', 'adaround',
           'calibrate', 'config', 'describe', 'hooks', 'model_inputs', 'parse_quant_dict',
           'quant_ranges', 'quantize_dequantize', 'resolved', 'rules', 'scale_zero_point',
           'validate_quant_config',
           'gamma_migration', 'token_wise_clipping', 'smoothquant']

# Weight quantization of the article (absmax / zero-point, weight-only int8) and LLM.int8().
from oqt_jax.quant.weight_int8 import (absmax_dequantize, absmax_quantize, weight_only,  # noqa: E402
                                       zeropoint_dequantize, zeropoint_quantize)
from oqt_jax.quant.methods.llm_int8 import llm_int8, llm_int8_matmul  # noqa: E402

__all__ += ['absmax_dequantize', 'absmax_quantize', 'llm_int8', 'llm_int8_matmul', 'weight_only',
            'zeropoint_dequantize', 'zeropoint_quantize']
