"""Flax BERT / OPT with clipped softmax and gated attention; HF checkpoint interop in hf.py."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oqt_jax.models.bert import Bert
from oqt_jax.models.config import ModelConfig, from_config, parse_softmax
from oqt_jax.models.generate import generate
from oqt_jax.models.opt import Opt
from oqt_jax.models.outputs import ModelOutput

__all__ = ['Bert', 'Opt', 'ModelConfig', 'ModelOutput', 'build', 'from_config', 'generate',
           'init_variables', 'parse_softmax']


def build(cfg: ModelConfig | Any, quant: Any = None) -> nn.Module:
  """Model module for a ModelConfig (or a `config.model` ConfigDict)."""
  cfg = from_config(cfg)
  return (Bert if cfg.model_type == 'bert' else Opt)(cfg, quant=quant)


def init_variables(model: nn.Module, rng, seq_len: int = 8, batch: int = 1, boxed: bool = False):
  """Randomly initialised variables; `boxed=True` keeps the logical-partitioning metadata."""
  ids = jnp.zeros((batch, seq_len), jnp.int32)
  variables = jax.jit(model.init)({'params': rng, 'dropout': rng}, ids, jnp.ones_like(ids))
  variables = {k: v for k, v in variables.items() if k != 'intermediates'}
  return variables if boxed else nn.meta.unbox(variables)
