"""Moving a per-channel factor out of a LayerNorm into the layers that read its output.

Shared by Gamma Migration (outlier_suppression.py: the factor is gamma) and SmoothQuant
(smoothquant.py: the factor is s). For a LayerNorm y = gamma * norm(x) + beta and a
per-dim factor f (D,):

  LN        scale := gamma / f, bias := beta / f        -> outputs y' = y / f
  Linears   W[j, :] *= f_j  for every Dense reading y   (Flax kernels are (in, out))
  residual  y' * f (exact in floating point)            where y also feeds a residual add or
                                                        an attention gate (post-LN models)

The model runs these LayerNorms as `LayerNorm(migrated=True)` (ModelConfig.gamma_migrated):
f is stored as their 'migrated_scale' parameter and multiplied back on the residual branch.
Which LayerNorms migrate (`ln_consumers`) follows the model code: every LayerNorm whose output
goes to the next Linear layers, except the last layer's output LN (BERT, post-LN OPT), OPT's
final decoder LN and the MLM head's LN (they feed the tied decoder / the heads).
Migrating twice (e.g. SmoothQuant after Gamma Migration) composes: the factors multiply.
"""
from __future__ import annotations

import flax
import jax
import numpy as np

from oqt_jax.errors import ConfigError

QKV = ('query', 'key', 'value')


def ln_consumers(cfg) -> list[tuple[tuple[str, ...], list[tuple[str, ...]]]]:
  """[(LayerNorm param path, [paths of the Dense layers reading its output]), ...]."""
  if getattr(cfg, 'norm', 'layernorm') == 'ssnorm':
    raise ConfigError("model.norm='ssnorm': Gamma Migration and SmoothQuant move a per-channel "
                      'factor out of each LayerNorm; a single-scale RMSNorm has none to move')
  n = int(cfg.num_layers)
  out = []
  if cfg.model_type == 'bert':
    qkv = lambda i: [(f'encoder_layer_{i}', 'attention', p) for p in QKV]
    if n:
      out.append((('embeddings', 'LayerNorm'), qkv(0)))
    for i in range(n):
      out.append(((f'encoder_layer_{i}', 'attention_ln'), [(f'encoder_layer_{i}', 'intermediate')]))
      if i < n - 1:
        out.append(((f'encoder_layer_{i}', 'output_ln'), qkv(i + 1)))
    return out
  qkv = lambda i: [(f'decoder_layer_{i}', 'attention', p) for p in QKV]
  fc1 = lambda i: [(f'decoder_layer_{i}', 'fc1')]
  for i in range(n):
    if cfg.do_layer_norm_before:
      out.append(((f'decoder_layer_{i}', 'attention_ln'), qkv(i)))
      out.append(((f'decoder_layer_{i}', 'ffn_ln'), fc1(i)))
    else:
      out.append(((f'decoder_layer_{i}', 'attention_ln'), fc1(i)))
      if i < n - 1:
        out.append(((f'decoder_layer_{i}', 'ffn_ln'), qkv(i + 1)))
  return out


def ln_point(cfg, ln_path) -> str:
  """The quantization point name of a LayerNorm's output ('eln', 'x3', 'z0', 'a1', ...)."""
  if ln_path == ('embeddings', 'LayerNorm'):
    return 'eln'
  layer = int(ln_path[0].rsplit('_', 1)[1])
  letter = {'attention_ln': 'a' if cfg.model_type == 'opt' else 'x',
            'output_ln': 'z', 'ffn_ln': 'x'}[ln_path[1]]
  return f'{letter}{layer}'


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def fp_variables(variables) -> dict:
  """{'params': ...} plus other collections, without 'quant' (ranges of the untransformed
  model would be stale) and 'intermediates'; params as a mutable nested dict of numpy."""
  variables = flax.core.unfreeze(variables) if isinstance(variables, flax.core.FrozenDict) \
      else dict(variables)
  out = {k: v for k, v in variables.items() if k not in ('quant', 'intermediates', 'params')}
  out['params'] = jax.tree_util.tree_map(lambda a: np.array(a, np.float32),
                                         flax.core.unfreeze(variables['params']))
  return out


def migrate(model, variables, factors: dict):
  """(model', variables') with factors[ln_path] (D,) moved out of each LayerNorm.

  model' = model with cfg.gamma_migrated = True (its quant hooks kept); LayerNorms without a
  factor get f = 1. The floating-point function is unchanged.
  """
  cfg = model.cfg
  v = fp_variables(variables)
  params = v['params']
  for ln_path, consumers in ln_consumers(cfg):
    ln = _get(params, ln_path)
    d = ln['scale'].shape[0]
    f = np.ones((d,), np.float32) if ln_path not in factors else \
        np.asarray(factors[ln_path], np.float32)
    if f.shape != (d,) or not np.all(np.isfinite(f)) or np.any(f == 0):
      raise ValueError(f'migration factor of {"/".join(ln_path)} must be finite, nonzero, '
                       f'shape ({d},); got shape {f.shape}')
    ln['scale'] = ln['scale'] / f
    ln['bias'] = ln['bias'] / f
    ln['migrated_scale'] = ln.get('migrated_scale', np.ones((d,), np.float32)) * f
    for c in consumers:
      dense = _get(params, c)
      dense['kernel'] = dense['kernel'] * f[:, None]
  new_model = model.clone(cfg=cfg.replace(gamma_migrated=True))
  return new_model, v
