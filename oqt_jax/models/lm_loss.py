"""The causal-LM loss as the models compute it (OPT's `lm_loss` output when called with
`loss_labels`): token cross-entropy as a (sum, count) pair, and the same loss with the head
applied a few chunks of positions at a time (evaluation). The training losses
(oqt_jax.train.losses) build on these.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100
CLM_CHUNK_ROWS = 512             # tokens (batch x length) per chunk of the CLM head


def cross_entropy_sum(logits, labels, weights):
  """Sum of token cross-entropies weighted by `weights` (0/1), and the sum of weights."""
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  safe = jnp.where(weights > 0, labels, 0).astype(jnp.int32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - picked) * weights), jnp.sum(weights)


def clm_loss(logits, labels, attention_mask=None):
  """(sum, count) of the causal-LM cross-entropy with the one-token shift."""
  logits, targets = logits[:, :-1], labels[:, 1:]
  weights = targets != IGNORE_INDEX
  if attention_mask is not None:
    weights = weights & (attention_mask[:, 1:] > 0)
  return cross_entropy_sum(logits, targets, weights)


def clm_num_chunks(batch: int, seq_len: int, chunk_rows: int = CLM_CHUNK_ROWS) -> int:
  """Chunks along T: the fewest that divide T with at most `chunk_rows` tokens each."""
  for n in range(1, seq_len + 1):
    if seq_len % n == 0 and batch * (seq_len // n) <= chunk_rows:
      return n
  return seq_len


def clm_targets(labels, attention_mask=None):
  """(targets int32 (B, T), weights float32 (B, T)) of the causal-LM loss aligned with the
  logits: position t predicts token t + 1; the last position and ignored / padded targets
  have weight 0 (and target 0)."""
  b = labels.shape[0]
  pad = lambda x, v: jnp.concatenate([x[:, 1:], jnp.full((b, 1), v, x.dtype)], axis=1)
  targets = pad(labels, IGNORE_INDEX)
  weights = targets != IGNORE_INDEX
  if attention_mask is not None:
    weights = weights & (pad(attention_mask, 0) > 0)
  return jnp.where(weights, targets, 0).astype(jnp.int32), weights.astype(jnp.float32)


def eval_num_chunks(batch: int, seq_len: int, chunk_rows: int | None = None,
                    max_chunks: int = 8) -> int:
  """Chunks along T for the evaluation's chunked LM head (unrolled, so at most
  `max_chunks`): the fewest that divide T with at most `chunk_rows` tokens each, else the
  largest divisor of T up to `max_chunks`."""
  n = clm_num_chunks(batch, seq_len, chunk_rows or CLM_CHUNK_ROWS)
  if n <= max_chunks:
    return n
  return max(d for d in range(1, max_chunks + 1) if seq_len % d == 0)


def clm_loss_by_chunks(logits_fn, hidden, labels, attention_mask=None, *,
                       chunk_rows: int | None = None):
  """(sum, count) of the causal-LM loss of logits_fn(hidden) (a row-wise head: its output at
  a token depends on that token's hidden state only), equal to clm_loss(logits_fn(hidden),
  ...) up to float summation order, with the head and the cross-entropy applied to a few
  chunks of positions (unrolled, at most 8; for evaluation, no custom gradient).

  Why: on CPU, XLA writes out the input of every large reduction and the shifted slice of
  the logits, and a quantized head's logits once more; per chunk these are smaller and the
  quantizer fuses into the chunk's passes (README, Performance). XLA may still keep the
  chunks' logits alive together, so the compiled temp memory is not reduced (the train
  step's scan, clm_loss_chunked, is).

  logits_fn(h_chunk (B, Tc, D), chunk slice) -> (B, Tc, V) float logits.
  """
  b, t = labels.shape
  targets, weights = clm_targets(labels, attention_mask)
  n = eval_num_chunks(b, t, chunk_rows)
  size = t // n
  total = jnp.zeros((), jnp.float32)
  for c in range(n):
    sl = slice(c * size, (c + 1) * size)
    ce, _ = cross_entropy_sum(logits_fn(hidden[:, sl], sl), targets[:, sl], weights[:, sl])
    total = total + ce
  return total, jnp.sum(weights)
