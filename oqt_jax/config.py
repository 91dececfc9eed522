"""Loading and validating experiment configs (ml_collections ConfigDicts from configs/*.py)."""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from oqt_jax.errors import ConfigError
from oqt_jax.models.config import ModelConfig, from_config


def load_config_file(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Run a configs/*.py file's get_config() (what --config does on the command line)."""
  if not os.path.exists(path):
    raise ConfigError(f'--config={path}: no such file')
  spec = importlib.util.spec_from_file_location('oqt_config', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  for key, value in (overrides or {}).items():
    node = cfg
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def model_config(config) -> ModelConfig:
  """The validated ModelConfig of an experiment config (compute dtype from config.compute_dtype)."""
  m = config.model.to_dict()
  if config.get('compute_dtype', 'float32') != 'float32' and m.get('dtype', 'float32') == 'float32':
    m['dtype'] = config.compute_dtype
  return from_config(m)


def validate(config) -> ml_collections.ConfigDict:
  """Validate every section; raises ConfigError('section.field=value: why') on the first problem."""
  model_config(config)
  for module, fn in (('oqt_jax.data', 'validate_data_config'),
                     ('oqt_jax.train.config', 'validate_train_config'),
                     ('oqt_jax.quant', 'validate_quant_config')):
    mod = importlib.import_module(module)
    getattr(mod, fn)(config)
  return config
