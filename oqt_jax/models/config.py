"""Typed, validated model configuration built from `config.model` (a ConfigDict)."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from oqt_jax.errors import ConfigError

SOFTMAX_RE = re.compile(r'^clipped\(\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*:\s*'
                        r'([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*\)$')
GATES = ('none', 'unconditional_per_head', 'conditional_per_head', 'conditional_per_token',
         'elementwise')
SINK_SOFTMAXES = ('softmax1', 'sink')   # beyond the paper: a softmax with room for "nothing"
ATTENTION_INITS = ('normal', 'torch_default')
ACTIVATIONS = ('gelu', 'gelu_new', 'relu')
HEADS = ('auto', 'mlm', 'clm', 'cls', 'none')
NORMS = ('layernorm', 'ssnorm')
DTYPES = ('float32', 'bfloat16', 'float16')


def parse_softmax(spec: str, field: str = 'model.softmax') -> tuple[float, float]:
  """'vanilla' -> (0, 1); 'clipped(GAMMA:ZETA)' -> (gamma, zeta)."""
  s = str(spec).strip()
  if s == 'vanilla' or s in SINK_SOFTMAXES:
    return 0.0, 1.0
  m = SOFTMAX_RE.match(s)
  if not m:
    raise ConfigError(f"{field}={spec!r}: expected 'vanilla', 'clipped(GAMMA:ZETA)' "
                      "(e.g. 'clipped(-.025:1)'), 'softmax1' or 'sink'")
  gamma, zeta = float(m.group(1)), float(m.group(2))
  if gamma > 0:
    raise ConfigError(f'{field}={spec!r}: gamma must be <= 0, got {gamma}')
  if zeta < 1:
    raise ConfigError(f'{field}={spec!r}: zeta must be >= 1, got {zeta}')
  return gamma, zeta


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything a model module needs; hashable so it can be a Flax module attribute."""
  model_type: str = 'bert'
  head: str = 'auto'
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  activation: str = 'gelu'
  init_std: float = 0.02
  pad_token_id: int = 0
  num_labels: int = 2
  do_layer_norm_before: bool = True
  word_embed_proj_dim: int = -1
  remove_final_layer_norm: bool = False
  enable_bias: bool = True
  softmax: str = 'vanilla'
  alpha: float = -1.0
  softmax_T: int = 128
  gate: str = 'none'
  gate_mlp: bool = False
  gate_linear_all_features: bool = False
  gate_init: float = 0.5
  fine_tuning: bool = False
  # Fine-tuning mode: std of the gate's last Linear (-1: the original's, BERT 0.01 / OPT 0.001;
  # 0: pi / gate_init is exactly 1 at the start, the checkpoint's function).
  gate_last_init_std: float = -1.0
  dtype: str = 'float32'
  attention_init: str = 'normal'
  gate_mlp2: bool = False
  # 'layernorm' | 'ssnorm': every LayerNorm a single-scale RMSNorm (Outlier-Safe Pre-training):
  # x / rms(x) * g with one learned scalar g (init 1), no bias, no per-channel gamma.
  norm: str = 'layernorm'
  # Set by quant.gamma_migration / quant.smoothquant (not a training knob): the LayerNorms
  # that feed the next layer keep a per-dim factor out of their output (LayerNorm.migrated).
  gamma_migrated: bool = False

  # ---- derived -------------------------------------------------------------------
  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def resolved_head(self) -> str:
    if self.head != 'auto':
      return self.head
    return 'mlm' if self.model_type == 'bert' else 'clm'

  @property
  def embed_dim(self) -> int:
    """OPT's word-embedding width (word_embed_proj_dim, or hidden_size)."""
    return self.hidden_size if self.word_embed_proj_dim in (-1, None) else self.word_embed_proj_dim

  @property
  def clip_gamma_zeta(self) -> tuple[float, float]:
    gamma, zeta = parse_softmax(self.softmax)
    if self.alpha is not None and self.alpha > 0:
      gamma = -self.alpha / self.softmax_T
    return gamma, zeta

  def replace(self, **kw) -> 'ModelConfig':
    return dataclasses.replace(self, **kw)   # validated on construction

  def __post_init__(self):
    self.validate()   # every ModelConfig is valid: the layers that take one never check again

  # ---- validation ----------------------------------------------------------------
  def validate(self) -> 'ModelConfig':
    def bad(field, msg):
      raise ConfigError(f'model.{field}={getattr(self, field)!r}: {msg}')

    if self.model_type not in ('bert', 'opt'):
      bad('model_type', "expected 'bert' or 'opt'")
    if self.head not in HEADS:
      bad('head', f'expected one of {HEADS}')
    for f in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size',
              'max_position_embeddings'):
      if int(getattr(self, f)) <= 0:
        bad(f, 'must be a positive integer')
    if self.hidden_size % self.num_heads:
      bad('num_heads', f'must divide hidden_size={self.hidden_size}')
    if self.activation not in ACTIVATIONS:
      bad('activation', f'expected one of {ACTIVATIONS}')
    for f in ('hidden_dropout', 'attention_dropout'):
      if not 0.0 <= getattr(self, f) < 1.0:
        bad(f, 'must be in [0, 1)')
    parse_softmax(self.softmax)
    if self.softmax_T <= 0:
      bad('softmax_T', 'must be positive')
    if self.gate not in GATES:
      bad('gate', f'expected one of {GATES}')
    if not 0.0 < self.gate_init < 1.0:
      bad('gate_init', 'must be in (0, 1)')
    if self.gate_last_init_std != -1.0 and not self.gate_last_init_std >= 0.0:
      bad('gate_last_init_std', 'expected -1 (the original\'s) or a std >= 0')
    if self.norm not in NORMS:
      bad('norm', f'expected one of {NORMS}')
    if self.norm == 'ssnorm' and self.gamma_migrated:
      bad('norm', 'Gamma Migration / SmoothQuant move a per-channel gamma out of the '
          'LayerNorm; a single-scale RMSNorm has none')
    if self.gate_mlp and self.gate_linear_all_features:
      bad('gate_mlp', 'gate_mlp and gate_linear_all_features are exclusive')
    if self.gate_mlp2 and (self.gate_mlp or self.gate_linear_all_features):
      bad('gate_mlp2', 'gate_mlp2, gate_mlp and gate_linear_all_features are exclusive')
    if ((self.gate_mlp or self.gate_mlp2 or self.gate_linear_all_features)
        and not self.gate.startswith('conditional')):
      bad('gate', 'gate_mlp / gate_mlp2 / gate_linear_all_features need a conditional_* gate')
    if self.attention_init not in ATTENTION_INITS:
      bad('attention_init', f'expected one of {ATTENTION_INITS}')
    if str(self.softmax).strip() in SINK_SOFTMAXES and self.alpha is not None and self.alpha > 0:
      bad('alpha', f'the alpha form sets a clipped softmax; model.softmax={self.softmax!r} '
          'has no gamma (set alpha=-1)')
    if self.gate_mlp and self.head_dim < 4:
      bad('gate_mlp', f'needs head_dim >= 4, got {self.head_dim}')
    if self.num_labels <= 0:
      bad('num_labels', 'must be >= 1 (1 = regression)')
    if self.dtype not in DTYPES:
      bad('dtype', f'expected one of {DTYPES}')
    if self.model_type == 'bert' and self.resolved_head == 'clm':
      bad('head', "BERT has no 'clm' head")
    if self.model_type == 'opt' and self.resolved_head == 'mlm':
      bad('head', "OPT has no 'mlm' head")
    if self.word_embed_proj_dim not in (-1, None) and self.word_embed_proj_dim <= 0:
      bad('word_embed_proj_dim', 'must be positive or -1')
    return self

  @property
  def gate_bias_init(self) -> float:
    return -math.log(1.0 / self.gate_init - 1.0)


def from_config(model_cfg: Mapping[str, Any] | Any) -> ModelConfig:
  """Build a validated ModelConfig from `config.model` (ConfigDict or dict)."""
  if isinstance(model_cfg, ModelConfig):
    return model_cfg
  d = dict(model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else model_cfg)
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ConfigError(f'model.{unknown[0]}: unknown model field (known: {", ".join(sorted(names))})')
  return ModelConfig(**d).validate()
