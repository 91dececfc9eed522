"""Language-modelling losses as (sum, count) pairs, so that micro-batches, devices and eval
batches combine exactly: mean = total_sum / total_count.

  MLM: cross-entropy over positions with labels != -100.
  CLM: logits at t predict labels at t+1; targets with labels == -100 or attention_mask == 0
       are ignored.
Cross-entropy is computed in float32 whatever the compute dtype. Perplexity = exp(mean CE).
"""
from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def cross_entropy_sum(logits, labels, weights):
  """Sum of token cross-entropies weighted by `weights` (0/1), and the sum of weights."""
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  safe = jnp.where(weights > 0, labels, 0).astype(jnp.int32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - picked) * weights), jnp.sum(weights)


def mlm_loss(logits, labels, attention_mask=None):
  """(sum, count) of the masked-LM cross-entropy; labels -100 (and padding) are ignored."""
  weights = labels != IGNORE_INDEX
  if attention_mask is not None:
    weights = weights & (attention_mask > 0)
  return cross_entropy_sum(logits, labels, weights)


def clm_loss(logits, labels, attention_mask=None):
  """(sum, count) of the causal-LM cross-entropy with the one-token shift."""
  logits, targets = logits[:, :-1], labels[:, 1:]
  weights = targets != IGNORE_INDEX
  if attention_mask is not None:
    weights = weights & (attention_mask[:, 1:] > 0)
  return cross_entropy_sum(logits, targets, weights)


def classification_loss(logits, labels):
  """(sum, count): softmax cross-entropy for (B, C) logits, squared error when C == 1.
  Rows labelled -100 (the filler rows of eval batches) are ignored."""
  valid = labels != IGNORE_INDEX
  if logits.shape[-1] == 1:
    err = logits[..., 0].astype(jnp.float32) - labels.astype(jnp.float32)
    w = valid.astype(jnp.float32)
    return jnp.sum(err * err * w), jnp.sum(w)
  return cross_entropy_sum(logits, labels, valid)


def loss_for_head(head: str, logits, batch: Mapping[str, jax.Array]):
  """(sum, count) for a model head ('mlm' | 'clm' | 'cls') on a data batch."""
  if head == 'mlm':
    return mlm_loss(logits, batch['labels'], batch.get('attention_mask'))
  if head == 'clm':
    return clm_loss(logits, batch['labels'], batch.get('attention_mask'))
  if head == 'cls':
    return classification_loss(logits, batch['labels'])
  raise ValueError(f'no training loss for model head {head!r}')


def mean_loss(loss_sum, count):
  return loss_sum / jnp.maximum(count, 1.0)


def perplexity(mean_ce):
  return jnp.exp(mean_ce)


# ------------------------------------------------------------------ the training fast path
# The training step needs only the loss, not the (B, T, V) logits the models return. For
# floating-point models the loss is computed from the final hidden states with the head's own
# parameters, doing less work than the full head yet giving the same loss and gradients:
#   MLM: the head runs on the masked positions only (as the original BERT's
#        masked_lm_positions), a static number of rows per sequence; a batch in which some
#        sequence has more masked tokens than that takes the full head instead (lax.cond).
#   CLM: the tied LM-head projection and its cross-entropy run over chunks of tokens with the
#        gradient formed chunk by chunk, so the float32 logits and their gradient never exist
#        whole (fused linear cross-entropy).
# The model's logits output is then unused and XLA drops it from the compiled step. Quantized
# models keep the plain path (their head carries quantizers and range statistics).

MLM_PREDICTION_FRACTION = 0.15   # the data's default masking probability
MLM_PREDICTION_SIGMAS = 3.0      # rows gathered per sequence: mean + 3 std of Binomial(T, p)
CLM_CHUNK_ROWS = 512             # tokens (batch x length) per chunk of the CLM head


def mlm_max_predictions(seq_len: int, p: float = MLM_PREDICTION_FRACTION,
                        sigmas: float = MLM_PREDICTION_SIGMAS) -> int:
  """Rows gathered per sequence for the MLM head: mean + `sigmas` std of the number of masked
  tokens, rounded up to a multiple of 8, at most seq_len."""
  k = seq_len * p + sigmas * math.sqrt(seq_len * p * (1.0 - p))
  return int(min(seq_len, 8 * math.ceil(k / 8.0)))


def bert_mlm_head(params, cfg, x):
  """BERT's MLM head (transform, LayerNorm, tied decoder + bias) on hidden states x (..., D),
  the same operations as models/bert.py for a floating-point model."""
  from oqt_jax.models.layers import ACTIVATIONS, dtype_of
  dtype = dtype_of(cfg.dtype)
  t = params['mlm_transform']
  h = jnp.einsum('...i,io->...o', x.astype(dtype), t['kernel'].astype(dtype))
  h = ACTIVATIONS[cfg.activation](h + t['bias'].astype(dtype))
  ln = params['mlm_ln']
  hf = h.astype(jnp.float32)
  mu = jnp.mean(hf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(hf - mu), axis=-1, keepdims=True)
  h = ((hf - mu) * jax.lax.rsqrt(var + cfg.layer_norm_eps) * ln['scale'] + ln['bias']).astype(dtype)
  table = params['word_embeddings']['embedding'].astype(dtype)
  return jnp.einsum('...d,vd->...v', h, table) + params['mlm_bias'].astype(dtype)


def mlm_loss_gathered(params, cfg, hidden, labels, attention_mask=None,
                      max_predictions: int | None = None):
  """(sum, count) of the MLM loss computing the head only at masked positions.

  Equal to mlm_loss(full logits, ...) in value and gradient. max_predictions rows are
  gathered per sequence (default mlm_max_predictions(T)); if any sequence has more masked
  tokens the full head is used for that batch.
  """
  weights = labels != IGNORE_INDEX
  if attention_mask is not None:
    weights = weights & (attention_mask > 0)
  t = labels.shape[-1]
  k = mlm_max_predictions(t) if max_predictions is None else int(max_predictions)
  if k >= t:
    return cross_entropy_sum(bert_mlm_head(params, cfg, hidden), labels, weights)
  # Masked positions first, in order (top_k of a decreasing score over masked positions).
  score = jnp.where(weights, t - jnp.arange(t, dtype=jnp.int32), 0)
  _, pos = jax.lax.top_k(score, k)
  overflow = jnp.any(jnp.sum(weights, axis=-1) > k)

  def gathered(_):
    xg = jnp.take_along_axis(hidden, pos[..., None], axis=-2)
    return cross_entropy_sum(bert_mlm_head(params, cfg, xg),
                             jnp.take_along_axis(labels, pos, axis=-1),
                             jnp.take_along_axis(weights, pos, axis=-1))

  def full(_):
    return cross_entropy_sum(bert_mlm_head(params, cfg, hidden), labels, weights)

  return jax.lax.cond(overflow, full, gathered, None)


def _chunk_rows(x, n_chunks):
  """(B, T, ...) -> (n_chunks, B, T // n_chunks, ...)."""
  b, t = x.shape[:2]
  x = x.reshape((b, n_chunks, t // n_chunks) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unchunk_rows(x):
  n, b, tc = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape((b, n * tc) + x.shape[3:])


def _linear_ce_chunks(h, table, targets, weights, n_chunks, with_grads):
  vocab = table.shape[0]
  xs = (_chunk_rows(h, n_chunks), _chunk_rows(targets, n_chunks),
        _chunk_rows(weights, n_chunks))

  def chunk(hc, tc, wc):
    logits = jnp.einsum('btd,vd->btv', hc, table).astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    return logits, logz, jnp.sum((logz - picked) * wc)

  if not with_grads:
    def body(acc, x):
      return acc + chunk(*x)[2], None
    loss, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return loss

  def body_grad(carry, x):
    loss, d_table = carry
    hc, tc, wc = x
    logits, logz, l = chunk(hc, tc, wc)
    d_logits = (jnp.exp(logits - logz[..., None]) - jax.nn.one_hot(tc, vocab, dtype=jnp.float32))
    d_logits = (d_logits * wc[..., None]).astype(hc.dtype)
    dh = jnp.einsum('btv,vd->btd', d_logits, table)
    # The table's gradient is accumulated transposed, (D, V): contracting the tokens as the
    # leading dims of both operands needs no copy of the (tokens, V) gradient (XLA:CPU would
    # transpose it for a (V, D) result).
    d_table_t = d_table + jnp.einsum('btd,btv->dv', hc, d_logits,
                                     preferred_element_type=jnp.float32)
    return (loss + l, d_table_t), dh

  init = (jnp.zeros((), jnp.float32), jnp.zeros(table.shape[::-1], jnp.float32))
  (loss, d_table_t), dh = jax.lax.scan(body_grad, init, xs)
  return loss, _unchunk_rows(dh), d_table_t.T.astype(table.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def linear_cross_entropy_sum(h, table, targets, weights, n_chunks: int):
  """sum_t w_t * CE(h_t @ table^T, target_t) over (B, T) tokens, n_chunks chunks along T.

  h: (B, T, D), table: (V, D) (same dtype), targets int (B, T), weights float (B, T).
  Under differentiation the gradients are formed chunk by chunk in the forward pass, so
  neither the logits nor their gradient is ever materialised whole and nothing is recomputed.
  """
  return _linear_ce_chunks(h, table, targets, weights, n_chunks, with_grads=False)


def _lce_fwd(h, table, targets, weights, n_chunks):
  loss, dh, d_table = _linear_ce_chunks(h, table, targets, weights, n_chunks, with_grads=True)
  return loss, (dh, d_table)


def _lce_bwd(n_chunks, res, g):
  dh, d_table = res
  return (dh * g.astype(dh.dtype), d_table * g.astype(d_table.dtype), None, None)


linear_cross_entropy_sum.defvjp(_lce_fwd, _lce_bwd)


def clm_num_chunks(batch: int, seq_len: int, chunk_rows: int = CLM_CHUNK_ROWS) -> int:
  """Chunks along T: the fewest that divide T with at most `chunk_rows` tokens each."""
  for n in range(1, seq_len + 1):
    if seq_len % n == 0 and batch * (seq_len // n) <= chunk_rows:
      return n
  return seq_len


def clm_loss_chunked(hidden, table, labels, attention_mask=None, *,
                     chunk_rows: int = CLM_CHUNK_ROWS, dtype=None):
  """(sum, count) of the causal-LM loss of the tied head logits = hidden @ table^T, equal to
  clm_loss(full logits, ...) in value and gradient, computed in chunks of tokens."""
  dtype = dtype or hidden.dtype
  b, t = labels.shape
  pad = lambda x, v: jnp.concatenate([x[:, 1:], jnp.full((b, 1), v, x.dtype)], axis=1)
  targets = pad(labels, IGNORE_INDEX)          # position t predicts token t + 1
  weights = targets != IGNORE_INDEX
  if attention_mask is not None:
    weights = weights & (pad(attention_mask, 0) > 0)
  targets = jnp.where(weights, targets, 0).astype(jnp.int32)
  weights = weights.astype(jnp.float32)
  n = clm_num_chunks(b, t, chunk_rows)
  loss = linear_cross_entropy_sum(hidden.astype(dtype), table.astype(dtype), targets, weights, n)
  return loss, jnp.sum(weights)


def train_loss(model, head: str, out, params, batch: Mapping[str, jax.Array]):
  """(sum, count) of the training loss of `model`'s output `out` (same value and gradient as
  loss_for_head(head, out.logits, batch)); the fast path for floating-point LM heads."""
  cfg = getattr(model, 'cfg', None)
  if model is None or getattr(model, 'quant', None) is not None or cfg is None:
    return loss_for_head(head, out.logits, batch)
  from oqt_jax.models.layers import dtype_of
  if head == 'mlm' and cfg.model_type == 'bert':
    return mlm_loss_gathered(params, cfg, out.last_hidden_state, batch['labels'],
                             batch.get('attention_mask'))
  if head == 'clm' and cfg.model_type == 'opt':
    return clm_loss_chunked(out.last_hidden_state, params['embed_tokens']['embedding'],
                            batch['labels'], batch.get('attention_mask'),
                            dtype=dtype_of(cfg.dtype))
  return loss_for_head(head, out.logits, batch)
