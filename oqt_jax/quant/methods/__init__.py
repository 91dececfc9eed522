"""Quantization methods, one module each, composable over (model, variables[, batches, qcfg]).

  lsq                  LSQ / LSQ+ learnable-range quantizers (QAT, Token-Wise Clipping's fine stage)
  migration            moving a per-channel factor out of a LayerNorm (Gamma Migration, SmoothQuant)
  outlier_suppression  Gamma Migration, Token-Wise Clipping (Outlier Suppression, NeurIPS 2022)
  smoothquant          SmoothQuant's activation-to-weight scale migration
  adaround             AdaRound: learned rounding of 4-bit weights, layer by layer (quant.adaround)
  qat                  quantization-aware training: the range state in the train state (train.py)
  llm_int8             LLM.int8() (vector-wise int8 matmuls, outlier dims in FP); weight-only int8
  compare              the method table of `eval.py --compare` (named pipelines of the above)

A transform that keeps the floating-point function returns (model, variables); a method
that quantizes returns (qmodel, qvariables) that run with `qmodel.apply` like any
calibrated model.

METHODS is the registry eval.py dispatches on (`config.quant.method`): name ->
function(model, variables, batches, qcfg, **kw) -> (qmodel, qvariables); '' is the plain
calibration. PRESETS holds a method's defaults (the original's bits and granularity), applied
by `with_preset` to the quant fields the user did not set.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Iterable, Optional


def _plain(model, variables, batches, qcfg, progress=False):
  from oqt_jax.quant.calibrate import calibrate
  return calibrate(model, variables, batches, qcfg, progress=progress)


def _outlier_suppression(model, variables, batches, qcfg, progress=False):
  """Gamma Migration, then Token-Wise Clipping (fine stage: qcfg.twc_fine)."""
  from oqt_jax.quant.methods import outlier_suppression as os_
  model, variables = os_.gamma_migration(model, variables)
  return os_.token_wise_clipping(model, variables, batches, qcfg, progress=progress)


def _smoothquant(model, variables, batches, qcfg, progress=False):
  """SmoothQuant (alpha = qcfg.smoothquant_alpha), then the plain calibration."""
  from oqt_jax.quant.calibrate import calibrate, model_inputs
  from oqt_jax.quant.methods import smoothquant as sq
  cal = [model_inputs(model, b) for b, _ in zip(batches, range(int(qcfg.est_num_batches)))]
  model, variables = sq.smoothquant(model, variables, cal,
                                    alpha=float(qcfg.get('smoothquant_alpha', 0.5)))
  return calibrate(model, variables, cal, qcfg, progress=progress)


METHODS: dict[str, Callable] = {
    '': _plain,
    'outlier_suppression': _outlier_suppression,
    'smoothquant': _smoothquant,
}

# The original's defaults of a method (REFERENCE: Outlier Suppression uses 6-bit asymmetric
# per-tensor activations, 6-bit symmetric per-channel MinMax weights, 256 calibration
# samples). 'calib_samples' sets est_num_batches = ceil(samples / batch size).
PRESETS: dict[str, dict] = {
    'outlier_suppression': dict(n_bits=6, n_bits_act=6, qmethod='symmetric_uniform',
                                qmethod_acts='asymmetric_uniform', per_channel=True,
                                ranges_weights='current_minmax', act_granularity='per_tensor',
                                calib_samples=256),
}


def with_preset(qcfg, method: str, explicit: Iterable[str] = (), batch_size: Optional[int] = None):
  """A copy of qcfg with PRESETS[method] set on every field not in `explicit` (the quant
  fields the user set, e.g. from --config.quant.X flags)."""
  q = qcfg.copy_and_resolve_references()
  explicit = set(explicit)
  for k, v in PRESETS.get(method, {}).items():
    if k == 'calib_samples':
      if 'est_num_batches' not in explicit and batch_size:
        q.est_num_batches = int(math.ceil(v / int(batch_size)))
    elif k not in explicit:
      q[k] = v
  return q


def run(method: str, model, variables, batches, qcfg, progress: bool = False):
  """METHODS[method](model, variables, batches, qcfg[, progress]) -> (qmodel, qvariables)."""
  fn = METHODS[method]
  kw = {'progress': progress} if 'progress' in inspect.signature(fn).parameters else {}
  return fn(model, variables, batches, qcfg, **kw)


from oqt_jax.quant.methods.llm_int8 import METHODS as INT8_METHODS  # noqa: E402  'llm_int8', 'weight_only'

METHODS.update(INT8_METHODS)
