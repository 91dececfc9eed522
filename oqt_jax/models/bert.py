"""BERT (post-LN encoder) with MLM and sequence-classification heads, in Flax Linen.

Parameter tree (HF names in brackets, see hf.py):
  word_embeddings, embeddings/{position_embeddings, token_type_embeddings}, embeddings/LayerNorm
  encoder_layer_{i}/attention/{query,key,value,out}      [attention.self.*, attention.output.dense]
  encoder_layer_{i}/attention_ln                          [attention.output.LayerNorm]
  encoder_layer_{i}/intermediate, output, output_ln       [intermediate.dense, output.dense, output.LayerNorm]
  pooler (cls head), classifier                           [bert.pooler.dense, classifier]
  mlm_transform, mlm_ln, mlm_bias                         [cls.predictions.transform.*, cls.predictions.bias]
Outlier statistics are sown into 'intermediates' per layer: ffn_output (before the residual),
ffn_residual (LayerNorm input), ffn_ln_output.

cfg.gamma_migrated (quant.gamma_migration / quant.smoothquant): every LayerNorm but the last
layer's output_ln and the MLM head's is `migrated`; an embedding / layer output is then the
pair (y', f) and the residual branch and the gate use y' * f (the Linear layers reading y' hold
f in their kernel rows). ffn_ln_output is then the f-free y'.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from oqt_jax.models.attention import MultiHeadAttention
from oqt_jax.models.config import ModelConfig
from oqt_jax.models.layers import (Dense, Dropout, Embed, LayerNorm, constrain, dtype_of, ln_output,
                                   qact, restore)
from oqt_jax.models.outputs import ModelOutput

EMBED_AXES = ('batch', 'length', 'embed')


class BertEmbeddings(nn.Module):
  cfg: ModelConfig
  quant: Any = None

  @nn.compact
  def __call__(self, word_embeds, token_type_ids, position_ids, tok_mask, deterministic):
    cfg, q = self.cfg, self.quant
    dtype = dtype_of(cfg.dtype)
    emb = lambda n, size, wp: Embed(size, cfg.hidden_size, wpoint=wp, init_std=cfg.init_std,
                                    dtype=dtype, quant=q, name=n)
    # As the original: (words + token types) quantized ('ewt'), then + positions ('e').
    x = word_embeds + emb('token_type_embeddings', cfg.type_vocab_size, 'Ets')(token_type_ids)
    x = qact(q, self, 'ewt', x, tok_mask)
    x = x + emb('position_embeddings', cfg.max_position_embeddings, 'Ep')(position_ids)
    x = constrain(qact(q, self, 'e', x, tok_mask), EMBED_AXES)
    x, f = ln_output(LayerNorm(point='eln', eps=cfg.layer_norm_eps, dtype=dtype, quant=q,
                               kind=cfg.norm, migrated=cfg.gamma_migrated,
                               name='LayerNorm')(x, tok_mask))
    x = constrain(Dropout(cfg.hidden_dropout)(x, deterministic=deterministic), EMBED_AXES)
    return x if f is None else (x, f)


class BertLayer(nn.Module):
  cfg: ModelConfig
  layer: int
  quant: Any = None

  @nn.compact
  def __call__(self, x, attn_mask, tok_mask, deterministic, x_scale=None):
    """x: the layer input (B, T, D); x_scale: its migrated factor (gamma_migrated models)."""
    cfg, i, q = self.cfg, self.layer, self.quant
    dtype = dtype_of(cfg.dtype)
    drop = lambda t: Dropout(cfg.hidden_dropout)(t, deterministic=deterministic)
    ln = lambda point, name, mig=cfg.gamma_migrated: LayerNorm(
        point=f'{point}{i}', eps=cfg.layer_norm_eps, dtype=dtype, quant=q, kind=cfg.norm,
        migrated=mig, name=name)
    residual = restore(x, x_scale)
    attn = MultiHeadAttention(cfg, layer=i, quant=q, name='attention')(
        x, residual, attn_mask, tok_mask, deterministic)
    u = constrain(qact(q, self, f'u{i}', residual + drop(attn), tok_mask), EMBED_AXES)
    x, xf = ln_output(ln('x', 'attention_ln')(u, tok_mask))
    x = constrain(x, EMBED_AXES)
    f = Dense(cfg.intermediate_size, point=f'f{i}', activation=cfg.activation,
              kernel_axes=('embed', 'mlp'), init_std=cfg.init_std, dtype=dtype, quant=q,
              name='intermediate')(x, tok_mask)
    f = constrain(f, ('batch', 'length', 'mlp'))
    h = Dense(cfg.hidden_size, point=f'h{i}', kernel_axes=('mlp', 'embed'),
              init_std=cfg.init_std, dtype=dtype, quant=q, name='output')(f, tok_mask)
    h = constrain(h, EMBED_AXES)
    self.sow('intermediates', 'ffn_output', h)
    y = constrain(qact(q, self, f'y{i}', restore(x, xf) + drop(h), tok_mask), EMBED_AXES)
    self.sow('intermediates', 'ffn_residual', y)
    last = i == cfg.num_layers - 1   # the last output LN keeps its gamma
    z, zf = ln_output(ln('z', 'output_ln', cfg.gamma_migrated and not last)(y, tok_mask))
    z = constrain(z, EMBED_AXES)
    self.sow('intermediates', 'ffn_ln_output', z)
    return z if zf is None else (z, zf)


class Bert(nn.Module):
  """BERT encoder with the head of cfg.resolved_head: 'mlm' | 'cls' | 'none'."""
  cfg: ModelConfig
  quant: Any = None

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
               deterministic: bool = True) -> ModelOutput:
    cfg, q = self.cfg, self.quant
    dtype = dtype_of(cfg.dtype)
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros((b, t), jnp.int32)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
    tok_mask = attention_mask.astype(bool)
    attn_mask = tok_mask[:, None, None, :]

    word = Embed(cfg.vocab_size, cfg.hidden_size, wpoint='Et', init_std=cfg.init_std, dtype=dtype,
                 quant=q, name='word_embeddings')
    x, f = ln_output(BertEmbeddings(cfg, quant=q, name='embeddings')(
        constrain(word(input_ids), EMBED_AXES), token_type_ids, position_ids, tok_mask,
        deterministic))
    hidden = [restore(x, f)]
    for i in range(cfg.num_layers):
      x, f = ln_output(BertLayer(cfg, layer=i, quant=q, name=f'encoder_layer_{i}')(
          x, attn_mask, tok_mask, deterministic, x_scale=f))
      hidden.append(restore(x, f))

    head = cfg.resolved_head
    logits, pooled = None, None
    if head == 'cls':
      pooled = Dense(cfg.hidden_size, point='P', activation='tanh', kernel_axes=('embed', 'mlp'),
                     init_std=cfg.init_std, dtype=dtype, quant=q, name='pooler')(x[:, 0])
      pooled_d = Dropout(cfg.hidden_dropout)(pooled, deterministic=deterministic)
      logits = Dense(cfg.num_labels, point='C', wpoint='wC', kernel_axes=('embed', 'classes'),
                     init_std=cfg.init_std, dtype=dtype, quant=q, name='classifier')(pooled_d)
    elif head == 'mlm':
      hm = Dense(cfg.hidden_size, point='Mt', activation=cfg.activation,
                 kernel_axes=('embed', 'mlp'), init_std=cfg.init_std, dtype=dtype, quant=q,
                 name='mlm_transform')(x, tok_mask)
      hm = LayerNorm(point='Mln', eps=cfg.layer_norm_eps, dtype=dtype, quant=q, kind=cfg.norm,
                     name='mlm_ln')(constrain(hm, EMBED_AXES), tok_mask)
      hm = constrain(hm, EMBED_AXES)
      bias = self.param('mlm_bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 ('vocab',)),
                        (cfg.vocab_size,), jnp.float32)
      # The decoder is tied to the word embeddings; its weight point is 'wM'.
      logits = word.attend(hm, wpoint='wM') + bias.astype(dtype)
      logits = constrain(qact(q, self, 'M', logits, tok_mask), ('batch', 'length', 'vocab'))
    return ModelOutput(logits=logits, hidden_states=tuple(hidden), last_hidden_state=x,
                       pooler_output=pooled)

