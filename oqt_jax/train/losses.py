"""Language-modelling losses as (sum, count) pairs, so that micro-batches, devices and eval
batches combine exactly: mean = total_sum / total_count.

  MLM: cross-entropy over positions with labels != -100.
  CLM: logits at t predict labels at t+1; targets with labels == -100 or attention_mask == 0
       are ignored.
Cross-entropy is computed in float32 whatever the compute dtype. Perplexity = exp(mean CE).
"""
from __future__ import annotations

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
