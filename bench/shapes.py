"""The benchmark's model shapes and synthetic batches, shared by the oqt_jax and PyTorch
workers (numpy only: the PyTorch worker may run in another Python environment)."""
from __future__ import annotations

import numpy as np

# The CPU shape: 4 layers, hidden 256, 4 heads, FFN 1024, seq 128, batch 16, fp32.
CPU_SHAPE = dict(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024,
                 seq_len=128, batch=16)
VOCAB = {'bert': 30522, 'opt': 50272}
VARIANTS = ('vanilla', 'clipped', 'gated')
# The recipes' attention settings (configs/recipes.py): BERT clipped(-0.025:1), gate MLP with
# gate_init 0.5; OPT alpha 12 (gamma = -12 / T), per-head linear gate with gate_init 0.25.
BERT_GAMMA, BERT_ZETA = -0.025, 1.0
OPT_ALPHA = 12.0
GATE_INIT = {'bert': 0.5, 'opt': 0.25}
DROPOUT = {'bert': (0.1, 0.1), 'opt': (0.1, 0.0)}   # (hidden, attention)
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.01, 1.0


def gamma_zeta(model_type: str, seq_len: int) -> tuple[float, float]:
  if model_type == 'bert':
    return BERT_GAMMA, BERT_ZETA
  return -OPT_ALPHA / seq_len, 1.0


def make_batch(model_type: str, batch: int, seq_len: int, seed: int = 0) -> dict:
  """input_ids, attention_mask, labels (+ token_type_ids for BERT); MLM: 15% of the tokens
  selected (80% [MASK]), labels -100 elsewhere; CLM: labels = input_ids."""
  rng = np.random.default_rng(seed)
  vocab = VOCAB[model_type]
  ids = rng.integers(1000, vocab, (batch, seq_len)).astype(np.int64)
  mask = np.ones((batch, seq_len), np.int64)
  if model_type == 'bert':
    ids[:, 0], ids[:, -1] = 101, 102
    sel = rng.random((batch, seq_len)) < 0.15
    sel[:, 0] = sel[:, -1] = False
    labels = np.where(sel, ids, -100)
    ids = np.where(sel & (rng.random((batch, seq_len)) < 0.8), 103, ids)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids),
                labels=labels)
  ids[:, 0] = 2
  return dict(input_ids=ids, attention_mask=mask, labels=ids.copy())


def flops_per_token(model_type: str, num_layers: int, hidden: int, intermediate: int,
                    seq_len: int, vocab: int, causal: bool | None = None) -> float:
  """Analytic training FLOPs per token (forward + backward = 3x forward matmul FLOPs):
  QKV/out projections, attention scores and context, FFN, and the vocabulary projection
  (BERT's MLM transform too). Attention is counted in full (no causal halving)."""
  per_layer = 2 * (4 * hidden * hidden + 2 * hidden * intermediate) + 2 * 2 * seq_len * hidden
  head = 2 * hidden * vocab + (2 * hidden * hidden if model_type == 'bert' else 0)
  return 3.0 * (num_layers * per_layer + head)
