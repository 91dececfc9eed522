"""OPT decoder (pre-LN or post-LN) with a causal-LM head tied to the embeddings, in Flax Linen.

Parameter tree (HF names in brackets, see hf.py):
  embed_tokens [decoder.embed_tokens], embed_positions [decoder.embed_positions] (offset 2)
  project_in / project_out   when word_embed_proj_dim != hidden_size (no bias)
  decoder_layer_{i}/attention/{query,key,value,out}   [self_attn.{q,k,v,out}_proj]
  decoder_layer_{i}/attention_ln [self_attn_layer_norm], ffn_ln [final_layer_norm], fc1, fc2
  final_ln [decoder.final_layer_norm] (pre-LN models unless remove_final_layer_norm)
Outlier statistics sown into 'intermediates' per layer: attn_output (out_proj), attn_ln_output,
ffn_output (fc2), ffn_ln_output, layer_output; and final_ln_output on the decoder.

cfg.gamma_migrated (quant.gamma_migration / quant.smoothquant): the layers' LayerNorms are
`migrated` (pre-LN: their outputs feed only Q/K/V or fc1; post-LN: also the residual, which
uses y' * f, as does the gate); final_ln and a post-LN model's last ffn_ln keep their gamma.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oqt_jax.models import lm_loss as losses
from oqt_jax.models.attention import MultiHeadAttention
from oqt_jax.models.config import ModelConfig
from oqt_jax.models.layers import (Dense, Dropout, Embed, LayerNorm, constrain, dtype_of, ln_output,
                                   qact, restore)

EMBED_AXES = ('batch', 'length', 'embed')
from oqt_jax.models.outputs import ModelOutput

POSITION_OFFSET = 2  # OPT's learned positions are shifted by 2 (a fairseq legacy)


def opt_position_ids(attention_mask):
  """Positions counted over non-padding tokens only (left padding shifts them), as HF OPT."""
  m = attention_mask.astype(jnp.int32)
  return jnp.cumsum(m, axis=1) * m - 1


class OptLayer(nn.Module):
  cfg: ModelConfig
  layer: int
  quant: Any = None

  @nn.compact
  def __call__(self, x, attn_mask, tok_mask, deterministic, decode=False, cache_index=None,
               x_scale=None):
    """x: the layer input (B, T, D); x_scale: its migrated factor (post-LN gamma_migrated)."""
    cfg, i, q = self.cfg, self.layer, self.quant
    dtype = dtype_of(cfg.dtype)
    pre = cfg.do_layer_norm_before
    drop = lambda t: Dropout(cfg.hidden_dropout)(t, deterministic=deterministic)
    ln = lambda point, name, mig=cfg.gamma_migrated: LayerNorm(
        point=f'{point}{i}', eps=cfg.layer_norm_eps, dtype=dtype, quant=q, kind=cfg.norm,
        migrated=mig, name=name)
    sow = lambda n, v: self.sow('intermediates', n, v)

    residual = restore(x, x_scale)
    f = x_scale
    if pre:
      x, f = ln_output(ln('a', 'attention_ln')(x, tok_mask))
      x = constrain(x, EMBED_AXES)
      sow('attn_ln_output', x)
    a = MultiHeadAttention(cfg, layer=i, quant=q, name='attention')(
        x, restore(x, f), attn_mask, tok_mask, deterministic, decode=decode,
        cache_index=cache_index)
    sow('attn_output', a)
    x = constrain(qact(q, self, f'u{i}', residual + drop(a), tok_mask), EMBED_AXES)
    f = None
    if not pre:
      x, f = ln_output(ln('a', 'attention_ln')(x, tok_mask))
      x = constrain(x, EMBED_AXES)
      sow('attn_ln_output', x)

    residual = restore(x, f)
    if pre:
      x, _ = ln_output(ln('x', 'ffn_ln')(x, tok_mask))
      x = constrain(x, EMBED_AXES)
      sow('ffn_ln_output', x)
    f = Dense(cfg.intermediate_size, point=f'f{i}', activation=cfg.activation,
              use_bias=cfg.enable_bias, kernel_axes=('embed', 'mlp'), init_std=cfg.init_std,
              dtype=dtype, quant=q, name='fc1')(x, tok_mask)
    f = constrain(f, ('batch', 'length', 'mlp'))
    h = Dense(cfg.hidden_size, point=f'h{i}', use_bias=cfg.enable_bias,
              kernel_axes=('mlp', 'embed'), init_std=cfg.init_std, dtype=dtype, quant=q,
              name='fc2')(f, tok_mask)
    h = constrain(h, EMBED_AXES)
    sow('ffn_output', h)
    x = constrain(qact(q, self, f'y{i}', residual + drop(h), tok_mask), EMBED_AXES)
    f = None
    if not pre:
      last = i == cfg.num_layers - 1   # the last output LN keeps its gamma
      x, f = ln_output(ln('x', 'ffn_ln', cfg.gamma_migrated and not last)(x, tok_mask))
      x = constrain(x, EMBED_AXES)
      sow('ffn_ln_output', x)
    sow('layer_output', x)
    return x if f is None else (x, f)


# Quantization-hook modes in which every quantizer acts on each token's values alone (ranges
# read from the store, or none), so the LM head can run on chunks of positions.
ROW_WISE_QUANT_MODES = ('frozen', 'fp')


class Opt(nn.Module):
  """OPT decoder with the head of cfg.resolved_head: 'clm' (tied LM head) | 'none'.

  loss_labels (B, T): also return the causal-LM loss as ModelOutput.lm_loss (sum, count),
  computed chunk by chunk without returning the logits where the hooks allow (evaluation).

  decode=True: incremental decoding with the key / value cache (models/generate.py):
  input_ids (B, t) are the tokens at positions [cache_index, cache_index + t) of a sequence
  of length L, attention_mask (B, L) marks the valid tokens of the whole sequence (the cache
  length is L), position_ids default to those of the full mask.
  """
  cfg: ModelConfig
  quant: Any = None

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, position_ids=None,
               deterministic: bool = True, decode: bool = False,
               cache_index=None, loss_labels=None) -> ModelOutput:
    cfg, q = self.cfg, self.quant
    dtype = dtype_of(cfg.dtype)
    b, t = input_ids.shape
    if decode:
      if attention_mask is None:
        raise ValueError('decode=True needs the (B, L) attention_mask of the whole sequence')
      length = attention_mask.shape[1]
      idx = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
      window = lambda a: jax.lax.dynamic_slice_in_dim(a, idx, t, axis=1)
      if position_ids is None:
        position_ids = window(opt_position_ids(attention_mask))
      kv_mask = attention_mask.astype(bool)
      tok_mask = window(kv_mask)
      q_pos = idx + jnp.arange(t)
      causal = jnp.arange(length)[None, :] <= q_pos[:, None]            # (t, L)
      attn_mask = causal[None, None] & kv_mask[:, None, None, :]
    else:
      if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
      if position_ids is None:
        position_ids = opt_position_ids(attention_mask)
      tok_mask = attention_mask.astype(bool)
      causal = jnp.tril(jnp.ones((t, t), bool))
      attn_mask = causal[None, None] & tok_mask[:, None, None, :]

    word = Embed(cfg.vocab_size, cfg.embed_dim, wpoint='Et', init_std=cfg.init_std, dtype=dtype,
                 quant=q, name='embed_tokens')
    x = constrain(word(input_ids), EMBED_AXES)
    project = cfg.embed_dim != cfg.hidden_size
    if project:
      x = Dense(cfg.hidden_size, point='pin', use_bias=False, kernel_axes=(None, 'embed'),
                init_std=cfg.init_std, dtype=dtype, quant=q, name='project_in')(x, tok_mask)
    pos = Embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size, wpoint='Ep',
                init_std=cfg.init_std, dtype=dtype, quant=q, name='embed_positions')
    # No dropout after the embedding sum (HF OPT and the originals have none).
    x = constrain(qact(q, self, 'e', x + pos(position_ids + POSITION_OFFSET), tok_mask),
                  EMBED_AXES)

    hidden = []
    f = None
    for i in range(cfg.num_layers):
      hidden.append(restore(x, f))
      x, f = ln_output(OptLayer(cfg, layer=i, quant=q, name=f'decoder_layer_{i}')(
          x, attn_mask, tok_mask, deterministic, decode, cache_index, x_scale=f))
    if cfg.do_layer_norm_before and not cfg.remove_final_layer_norm:
      x = LayerNorm(point='fln', eps=cfg.layer_norm_eps, dtype=dtype, quant=q, kind=cfg.norm,
                    name='final_ln')(x, tok_mask)
      x = constrain(x, EMBED_AXES)
      self.sow('intermediates', 'final_ln_output', x)
    if project:
      x = Dense(cfg.embed_dim, point='pout', use_bias=False, kernel_axes=('embed', None),
                init_std=cfg.init_std, dtype=dtype, quant=q, name='project_out')(x, tok_mask)
    hidden.append(x)

    logits = lm_loss = None
    if cfg.resolved_head == 'clm':
      head = lambda h, m: constrain(qact(q, self, 'M', word.attend(h, wpoint='wM'), m),
                                    ('batch', 'length', 'vocab'))
      if loss_labels is not None and not decode:
        if q is None or getattr(q, 'mode', None) in ROW_WISE_QUANT_MODES:
          # Evaluation: head + cross-entropy chunk by chunk (losses.clm_loss_by_chunks).
          lm_loss = losses.clm_loss_by_chunks(lambda h, sl: head(h, tok_mask[:, sl]), x,
                                              loss_labels, attention_mask)
        else:   # the hooks see the whole tensor (calibration, dynamic ranges)
          logits = head(x, tok_mask)
          lm_loss = losses.clm_loss(logits, loss_labels, attention_mask)
      else:
        logits = head(x, tok_mask)
    elif cfg.resolved_head not in ('none',):
      raise ValueError(f'model.head={cfg.head!r} is not supported for OPT')
    return ModelOutput(logits=logits, hidden_states=tuple(hidden), last_hidden_state=x,
                       lm_loss=lm_loss)
