"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights.

  model, variables = quant.smoothquant(model, variables, batches, alpha=0.5)
  qmodel, qvariables = quant.calibrate(model, variables, batches, qcfg)     # the usual W8A8
  qmodel, qvariables = smoothquant_method(model, variables, batches, quant.config(**PRESET))

The original's W8A8 evaluation (its fake_quant.py, `quantize_model` defaults) is PRESET:
every Linear inside the decoder layers (Q, K, V, out, fc1, fc2) gets per-output-channel
symmetric absmax weights, s = max|W_row| / 127, and its input is quantized per token
(dynamic: each row's absmax / 127, computed from the current tensor); the Linear outputs,
residual sums, LayerNorm gammas, embeddings and the LM head stay floating point
(quant_setup='linear_inputs', act_granularity='per_token', symmetric_signed=True: the signed
grid also on ReLU outputs, as the original). Options of the original:
  quantize_bmm_input   quant_dict="{'q': 8, 'k': 8, 'v': 8}" (Q, K, V outputs, per token);
  per-tensor static    PRESET_STATIC: its int8 OPT (smoothquant/opt.py with torch_int's
                       kernels): per-tensor absmax weights, per-tensor static input ranges
                       (max |x| over the calibration set, allminmax), and the bmm inputs
                       (Q, K, V, the probabilities) on static per-tensor ranges too.

For every LayerNorm whose output X feeds Linear layers (the same LayerNorms as Gamma
Migration, migration.ln_consumers), per hidden dim j:

  s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

max|X_j| over the calibration batches' valid tokens (padding excluded) of the floating-point
LN output, max|W_j| over the input row j of all the Linears reading X jointly (Q, K and V
together); both clamped to >= 1e-5 as the original. Then LN gamma, beta /= s and the Linears'
W[j, :] *= s_j: X / s has flatter channels, the weights absorb s. The floating-point output
is unchanged.

Post-LN models (BERT, post-LN OPT): the LN output also feeds the residual branch (and BERT's
attention gate). SmoothQuant proper only smooths LNs that feed Linears alone (pre-LN OPT);
here the residual branch gets the same exact treatment as Gamma Migration: it uses (X / s) * s,
s kept as the LN's 'migrated_scale' (ModelConfig.gamma_migrated), so every LayerNorm that
feeds Linears is smoothed and the FP output stays unchanged. The residual sum's quantizer
('u', 'y') sees the same tensor as before; only the LN output's quantizer sees X / s.
Composes with Gamma Migration (apply that first: s is then computed on the gamma-free X).
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from oqt_jax.models.layers import LayerNorm
from oqt_jax.quant.calibrate import calibrate, model_inputs
from oqt_jax.quant.methods import migration
from oqt_jax.quant.points import assemble, resolved

CLAMP = 1e-5

# The original's W8A8 setting (fake_quant.py W8A8Linear, weight_quant='per_channel',
# act_quant='per_token', quantize_output=False; smoothing alpha 0.5 for OPT). dynamic=True:
# its activation quantizers (per token, or per tensor with act_quant='per_tensor') take their
# ranges from each tensor, so nothing is calibrated but the smoothing factors.
PRESET: dict = dict(
    n_bits=8, n_bits_act=8, qmethod='symmetric_uniform', per_channel=True,
    ranges_weights='current_minmax', qmethod_acts='symmetric_uniform',
    act_granularity='per_token', quant_setup='linear_inputs', symmetric_signed=True,
    quant_dict='', dynamic=True, smoothquant_alpha=0.5)
# Its per-tensor static variant (int8 OPT): per-tensor weights; static per-tensor absmax
# ranges (max over the calibration set) of every Linear input and of the bmm inputs.
PRESET_STATIC: dict = dict(
    PRESET, per_channel=False, act_granularity='per_tensor', ranges_acts='allminmax', dynamic=False,
    quant_dict="{'q': 8, 'k': 8, 'v': 8, 'p': 8}")
# get_act_scales / get_static_decoder_layer_scales: 512 samples of 512 tokens.
CALIB_SAMPLES = 512


def activation_absmax(model, variables, batches: Iterable[Any]) -> dict:
  """{LayerNorm path: max |output| per dim (D,)} of the floating-point model over the
  batches' valid tokens, for the LayerNorms of migration.ln_consumers."""
  fp = model.clone(quant=None)
  targets = {p for p, _ in migration.ln_consumers(model.cfg)}
  params = {k: v for k, v in dict(variables).items() if k not in ('quant', 'intermediates')}

  @jax.jit
  def absmax(v, inputs):
    _, st = fp.apply(v, **inputs, capture_intermediates=lambda m, _: isinstance(m, LayerNorm),
                     mutable=['intermediates'])
    out = {}
    mask = inputs.get('attention_mask')
    for path in targets:
      node = st['intermediates']
      for k in path:
        node = node[k]
      y = node['__call__'][0]
      y = y[0] if isinstance(y, tuple) else y        # migrated LN: (y', f)
      a = jnp.abs(y.astype(jnp.float32))
      if mask is not None:
        a = jnp.where(mask.astype(bool)[..., None], a, 0.0)
      out[path] = jnp.max(a.reshape(-1, a.shape[-1]), axis=0)
    return out

  acc = None
  for b in batches:
    m = absmax(params, model_inputs(model, b))
    acc = m if acc is None else {k: jnp.maximum(acc[k], m[k]) for k in acc}
  if acc is None:
    raise ValueError('smoothquant: no calibration batches')
  return {k: np.asarray(v) for k, v in acc.items()}


def smoothing_factors(model, variables, act_absmax: dict, alpha: float = 0.5) -> dict:
  """{LayerNorm path: s (D,)}: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)."""
  params = variables['params']
  out = {}
  for ln_path, consumers in migration.ln_consumers(model.cfg):
    w = np.concatenate([np.abs(np.asarray(migration._get(params, c)['kernel'], np.float32))
                        for c in consumers], axis=1)
    w_max = np.maximum(w.max(axis=1), CLAMP)
    x_max = np.maximum(np.asarray(act_absmax[ln_path], np.float32), CLAMP)
    out[ln_path] = (x_max ** alpha / w_max ** (1.0 - alpha)).astype(np.float32)
  return out


def smoothquant(model, variables, batches: Iterable[Any], alpha: float = 0.5, *,
                num_batches: int | None = None):
  """(model', variables'): SmoothQuant-smoothed model (module docstring); FP output unchanged.

  batches: calibration batches (dicts as for quant.calibrate; the first num_batches, default
  all). Drops any 'quant' collection: calibrate afterwards.
  """
  if not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f'smoothquant: alpha={alpha} must be in [0, 1]')
  batches = list(itertools.islice(iter(batches), num_batches)) if num_batches else list(batches)
  act = activation_absmax(model, variables, batches)
  s = smoothing_factors(model, variables, act, float(alpha))
  # migrate() divides the LN by f and multiplies the Linear rows by f: f = s.
  return migration.migrate(model, variables, s)


def smoothquant_method(model, variables, batches: Iterable[Any], qcfg=None, progress=False):
  """SmoothQuant then calibration: (qmodel, qvariables).

  The activation maxima and the calibration use the first qcfg.est_num_batches batches;
  alpha is qcfg.smoothquant_alpha. qcfg None: quant.config(**PRESET) (the original's W8A8).
  """
  qcfg = resolved(assemble(**PRESET) if qcfg is None else qcfg)
  n = int(qcfg.get('est_num_batches', 16))
  cal = [model_inputs(model, b) for b in itertools.islice(iter(batches), n)]
  model, variables = smoothquant(model, variables, cal,
                                 alpha=float(qcfg.get('smoothquant_alpha', 0.5)))
  return calibrate(model, variables, cal, qcfg, progress=progress)
