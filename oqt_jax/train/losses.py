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
from typing import Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oqt_jax import models
from oqt_jax.models.layers import ACTIVATIONS, dtype_of, logical_spec
from oqt_jax.models.lm_loss import (CLM_CHUNK_ROWS, IGNORE_INDEX, clm_loss,  # noqa: F401
                                    clm_loss_by_chunks, clm_num_chunks, clm_targets,
                                    cross_entropy_sum, eval_num_chunks)


def mlm_loss(logits, labels, attention_mask=None):
  """(sum, count) of the masked-LM cross-entropy; labels -100 (and padding) are ignored."""
  weights = labels != IGNORE_INDEX
  if attention_mask is not None:
    weights = weights & (attention_mask > 0)
  return cross_entropy_sum(logits, labels, weights)


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
MLM_PREDICTION_SIGMAS = 3.0      # rows gathered: mean + 3 std of Binomial(tokens, p)


def mlm_max_predictions(tokens: int, p: float = MLM_PREDICTION_FRACTION,
                        sigmas: float = MLM_PREDICTION_SIGMAS) -> int:
  """Rows gathered for the MLM head out of `tokens` positions (the whole batch, B x T): mean
  + `sigmas` std of the number of masked tokens, rounded up to a multiple of 8, at most
  `tokens`."""
  k = tokens * p + sigmas * math.sqrt(tokens * p * (1.0 - p))
  return int(min(tokens, 8 * math.ceil(k / 8.0)))


def _mlm_transform(params, cfg, x):
  """BERT's MLM transform (dense, activation, LayerNorm) on hidden states x (..., D)."""
  dtype = dtype_of(cfg.dtype)
  t = params['mlm_transform']
  h = jnp.einsum('...i,io->...o', x.astype(dtype), t['kernel'].astype(dtype))
  h = ACTIVATIONS[cfg.activation](h + t['bias'].astype(dtype))
  ln = params['mlm_ln']
  hf = h.astype(jnp.float32)
  mu = jnp.mean(hf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(hf - mu), axis=-1, keepdims=True)
  return ((hf - mu) * jax.lax.rsqrt(var + cfg.layer_norm_eps) * ln['scale']
          + ln['bias']).astype(dtype)


def bert_mlm_head(params, cfg, x):
  """BERT's MLM head (transform, LayerNorm, tied decoder + bias) on hidden states x (..., D),
  the same operations as models/bert.py for a floating-point model."""
  dtype = dtype_of(cfg.dtype)
  h = _mlm_transform(params, cfg, x)
  table = params['word_embeddings']['embedding'].astype(dtype)
  return (jnp.einsum('...d,vd->...v', h, table, preferred_element_type=jnp.float32)
          + params['mlm_bias'].astype(dtype))


class _MlmHead(NamedTuple):
  """The static part of the fused MLM head: what `_mlm_transform` reads of the model config,
  the batch groups and the rows per group of one pass."""
  dtype: str
  activation: str
  layer_norm_eps: float
  groups: int
  rows: int


def _mlm_rows(spec: _MlmHead, head, table, bias, hidden, pos, labels, weights, with_grads):
  """Loss (and gradients) of the MLM head on the rows `pos` (G, k) of hidden (G, N, D), with
  labels (G, N) and the rows' weights (G, k).

  The decoder and its cross-entropy are differentiated by hand, so only the (G*k, V) logits
  and one same-sized gradient exist: d_logits = (softmax - onehot) * w, d_bias its column
  sum (as a product with ones: XLA:CPU's column reduction is far slower), d_h = d_logits @
  table, and the table's gradient accumulated transposed (D, V) (the rows are the leading
  dims of both operands: no copy of d_logits). The small transform (dense, activation,
  LayerNorm) goes through jax.vjp."""
  dtype = dtype_of(spec.dtype)
  g, k = pos.shape
  xg = jnp.take_along_axis(hidden, pos[..., None], axis=1).reshape(g * k, hidden.shape[-1])
  tg = jnp.take_along_axis(labels, pos, axis=1).reshape(g * k)
  wg = weights.reshape(g * k)
  transform = lambda hp, x: _mlm_transform(hp, spec, x)
  if with_grads:
    h, pull = jax.vjp(transform, head, xg)
  else:
    h = transform(head, xg)
  tbl = table.astype(dtype)
  logits = (jnp.einsum('nd,vd->nv', h, tbl, preferred_element_type=jnp.float32)
            + bias.astype(dtype).astype(jnp.float32))
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, tg[:, None], axis=-1)[:, 0]
  loss = jnp.sum((logz - picked) * wg)
  if not with_grads:
    return loss
  d_logits = (jnp.exp(logits - logz[:, None])
              - jax.nn.one_hot(tg, tbl.shape[0], dtype=jnp.float32)) * wg[:, None]
  d_bias = jnp.einsum('n,nv->v', jnp.ones(wg.shape, jnp.float32), d_logits)
  dl = d_logits.astype(dtype)
  dh = jnp.einsum('nv,vd->nd', dl, tbl)
  d_table_t = jnp.einsum('nd,nv->dv', h, dl, preferred_element_type=jnp.float32)
  d_head, dx = pull(dh.astype(h.dtype))
  return loss, d_head, d_table_t, d_bias, dx.reshape(g, k, -1)


def _mlm_head_loss(spec: _MlmHead, head, table, bias, hidden, labels, weights, with_grads):
  """hidden (B, T, D), labels and weights (B, T); the batch is split into spec.groups groups
  of whole sequences (one per batch shard, so that no device needs another's rows). Each
  group's masked rows when every group has at most spec.rows of them (one pass, top_k
  positions, masked first), else every position in passes of spec.rows rows per group
  (lax.cond; the same result either way)."""
  b, t, d = hidden.shape
  g, k = spec.groups, spec.rows
  n = b * t // g
  hidden, labels, weights = (hidden.reshape(g, n, d), labels.reshape(g, n),
                             weights.reshape(g, n))
  score = jnp.where(weights > 0, n - jnp.arange(n, dtype=jnp.int32), 0)
  _, pos = jax.lax.top_k(score, k)
  overflow = jnp.any(jnp.sum(weights > 0, axis=1) > k)
  rows = functools.partial(_mlm_rows, spec, head, table, bias, hidden)
  scatter = jax.vmap(lambda z, p, v: z.at[p].add(v))

  def gathered(_):
    out = rows(pos, labels, jnp.take_along_axis(weights, pos, axis=1), with_grads)
    if not with_grads:
      return out
    loss, d_head, d_table_t, d_bias, dx = out
    return loss, d_head, d_table_t, d_bias, scatter(jnp.zeros(hidden.shape, dx.dtype), pos, dx)

  def full(_):
    # Every position, m passes of k per group; positions past the end repeat the last one
    # with weight 0.
    m = -(-n // k)
    all_pos = jnp.arange(m * k, dtype=jnp.int32).reshape(m, 1, k)
    valid = jnp.broadcast_to(all_pos < n, (m, g, k))
    all_pos = jnp.broadcast_to(jnp.minimum(all_pos, n - 1), (m, g, k))
    w_all = jnp.where(valid, jax.vmap(lambda p: jnp.take_along_axis(weights, p, axis=1))(all_pos),
                      0.0)

    if not with_grads:
      def body(acc, xs):
        return acc + rows(xs[0], labels, xs[1], False), None
      return jax.lax.scan(body, jnp.zeros((), jnp.float32), (all_pos, w_all))[0]

    def body_grad(carry, xs):
      loss, d_head, d_table_t, d_bias, dx = rows(xs[0], labels, xs[1], True)
      return jax.tree.map(jnp.add, carry, (loss, d_head, d_table_t, d_bias)), dx
    zero = lambda x: jnp.zeros(x.shape, x.dtype)
    init = (jnp.zeros((), jnp.float32), jax.tree.map(zero, head),
            jnp.zeros(table.shape[::-1], jnp.float32), jnp.zeros(bias.shape, jnp.float32))
    (loss, d_head, d_table_t, d_bias), dx = jax.lax.scan(body_grad, init, (all_pos, w_all))
    dx = jnp.moveaxis(dx, 0, 1).reshape(g, m * k, d)[:, :n]      # passes are in order
    return loss, d_head, d_table_t, d_bias, dx

  out = jax.lax.cond(overflow, full, gathered, None)
  if not with_grads:
    return out
  loss, d_head, d_table_t, d_bias, dx = out
  return loss, d_head, d_table_t, d_bias, dx.reshape(b, t, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mlm_head_loss_sum(spec: _MlmHead, head, table, bias, hidden, labels, weights):
  """Sum of weighted MLM cross-entropies of BERT's head (transform `head`, tied decoder
  `table`, `bias`) on hidden (B, T, D), computed on the masked rows only; under
  differentiation the gradients are formed in the forward pass (nothing of the head is kept
  for the backward pass but the gradients themselves)."""
  return _mlm_head_loss(spec, head, table, bias, hidden, labels, weights, with_grads=False)


def _mlm_fwd(spec, head, table, bias, hidden, labels, weights):
  loss, d_head, d_table_t, d_bias, dx = _mlm_head_loss(spec, head, table, bias, hidden, labels,
                                                       weights, with_grads=True)
  return loss, (d_head, d_table_t.T.astype(table.dtype), d_bias.astype(bias.dtype), dx)


def _mlm_bwd(spec, res, g):
  scale = lambda x: x * g.astype(x.dtype)
  d_head, d_table, d_bias, dx = res
  return jax.tree.map(scale, d_head), scale(d_table), scale(d_bias), scale(dx), None, None


mlm_head_loss_sum.defvjp(_mlm_fwd, _mlm_bwd)


def batch_shards(batch: int) -> int:
  """How many devices the batch dimension is split over under the current mesh and logical
  axis rules (the train / eval steps' activation context); 1 outside one."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return 1
  sizes = dict(mesh.shape)
  spec = logical_spec(('batch',), (batch,), sizes, rules)
  axes = spec[0] if len(spec) else None
  axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return int(math.prod(sizes[a] for a in axes))


def mlm_loss_gathered(params, cfg, hidden, labels, attention_mask=None,
                      max_predictions: int | None = None, groups: int | None = None):
  """(sum, count) of the MLM loss computing the head only at masked positions.

  Equal to mlm_loss(full logits, ...) in value and gradient. The batch is split into
  `groups` groups of whole sequences (default: batch_shards(B), one per device holding
  part of the batch) and max_predictions rows are gathered from each (default
  mlm_max_predictions(tokens per group)); if a group has more masked tokens, every position
  goes through the head (in passes of max_predictions rows per group).
  """
  weights = labels != IGNORE_INDEX
  if attention_mask is not None:
    weights = weights & (attention_mask > 0)
  b, t = labels.shape
  g = batch_shards(b) if groups is None else int(groups)
  if g < 1 or b % g:
    raise ValueError(f'mlm_loss_gathered: {g} groups do not divide a batch of {b}')
  n = b * t // g
  k = mlm_max_predictions(n) if max_predictions is None else int(max_predictions)
  k = max(1, min(k, n))
  spec = _MlmHead(str(cfg.dtype), str(cfg.activation), float(cfg.layer_norm_eps), g, k)
  head = {'mlm_transform': params['mlm_transform'], 'mlm_ln': params['mlm_ln']}
  safe = jnp.where(weights, labels, 0).astype(jnp.int32)
  wf = weights.astype(jnp.float32)
  loss = mlm_head_loss_sum(spec, head, params['word_embeddings']['embedding'],
                           params['mlm_bias'], hidden, safe, wf)
  return loss, jnp.sum(wf)


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


def clm_loss_chunked(hidden, table, labels, attention_mask=None, *,
                     chunk_rows: int = CLM_CHUNK_ROWS, dtype=None):
  """(sum, count) of the causal-LM loss of the tied head logits = hidden @ table^T, equal to
  clm_loss(full logits, ...) in value and gradient, computed in chunks of tokens."""
  dtype = dtype or hidden.dtype
  b, t = labels.shape
  targets, weights = clm_targets(labels, attention_mask)
  n = clm_num_chunks(b, t, chunk_rows)
  loss = linear_cross_entropy_sum(hidden.astype(dtype), table.astype(dtype), targets, weights, n)
  return loss, jnp.sum(weights)


def train_loss(model, head: str, out, params, batch: Mapping[str, jax.Array]):
  """(sum, count) of the training loss of `model`'s output `out` (same value and gradient as
  loss_for_head(head, out.logits, batch)); the fast path for floating-point LM heads."""
  cfg = getattr(model, 'cfg', None)
  if model is None or getattr(model, 'quant', None) is not None or cfg is None:
    return loss_for_head(head, out.logits, batch)
  if head == 'mlm' and cfg.model_type == 'bert':
    return mlm_loss_gathered(params, cfg, out.last_hidden_state, batch['labels'],
                             batch.get('attention_mask'))
  if head == 'clm' and cfg.model_type == 'opt':
    return clm_loss_chunked(out.last_hidden_state, params['embed_tokens']['embedding'],
                            batch['labels'], batch.get('attention_mask'),
                            dtype=dtype_of(cfg.dtype))
  return loss_for_head(head, out.logits, batch)


# ------------------------------------------------------------------ distillation
def distill_loss(hidden, teacher_hidden, attention_mask, mlm=None, mlm_weight: float = 0.0):
  """(sum, count) of the distillation objective (config.loss='distill'): per non-padding token
  the mean over features of (student - teacher)^2 of the final hidden states, summed, over the
  number of such tokens; with `mlm` = (logits, labels) and mlm_weight > 0 the masked tokens'
  cross-entropy times mlm_weight is added to the sum (same count)."""
  w = attention_mask.astype(jnp.float32)
  d = hidden.astype(jnp.float32) - jax.lax.stop_gradient(teacher_hidden.astype(jnp.float32))
  s = jnp.sum(jnp.mean(d * d, axis=-1) * w)
  if mlm is not None and mlm_weight > 0:
    ce, _ = mlm_loss(mlm[0], mlm[1], attention_mask)
    s = s + mlm_weight * ce
  return s, jnp.sum(w)


VARIANT_PARAMS = ('gate', 'sink')   # attention-variant parameters a vanilla teacher lacks


def make_teacher(mcfg, params):
  """The frozen teacher of config.loss='distill': the `init_from` checkpoint's function (the
  model with vanilla attention, no gates, float32) with `params` (the checkpoint's, the
  variant's extra parameters left out). Returns host_batch -> (A, B, T, D) float32 numpy final
  hidden states, one deterministic forward per micro-batch."""
  tcfg = mcfg.replace(softmax='vanilla', alpha=-1.0, gate='none', gate_mlp=False,
                      gate_mlp2=False, gate_linear_all_features=False, fine_tuning=False,
                      dtype='float32')
  teacher = models.build(tcfg)

  def strip(tree):
    if not isinstance(tree, Mapping):
      return tree
    return {k: strip(v) for k, v in tree.items() if k not in VARIANT_PARAMS}
  tparams = jax.device_get(strip(params))
  keys = ('input_ids', 'attention_mask', 'token_type_ids')
  keys = keys if tcfg.model_type == 'bert' else keys[:2]

  @jax.jit
  def forward(p, inputs):
    return teacher.apply({'params': p}, **inputs, deterministic=True).last_hidden_state

  def run(hb):
    outs = [np.asarray(forward(tparams, {k: hb[k][a] for k in keys if k in hb}),
                       dtype=np.float32) for a in range(hb['input_ids'].shape[0])]
    return np.stack(outs)
  run.model, run.params = teacher, tparams
  return run
