"""Multi-head self-attention shared by BERT and OPT: clipped softmax and gated attention.

clipped_softmax(x) = clip((zeta - gamma) * softmax(x) + gamma, 0, 1)   (vanilla: gamma=0, zeta=1)

Gates multiply the per-head context softmax(QK^T/sqrt(d)) V, shape (B, H, T, d_head), by
pi in (0, 1) before the heads are merged and the output projection applied:
  unconditional_per_head  pi_h = sigmoid(a_h), a = 0 at init
  conditional_per_token   pi = sigmoid(Linear_h(x_h)), x split into heads like Q/K/V -> (B,H,T,1)
  conditional_per_head    logits of conditional_per_token averaged over T -> (B,H,1,1)
  gate_mlp                per-head Linear(d, d//4) -> ReLU -> Linear(d//4, 1)
  gate_linear_all_features  one Linear(d_model -> H) over all features, per token
Conditional gates' last bias starts at logit(gate_init); in fine-tuning mode the gate is
scaled by 1/gate_init and its weights start near zero, so a pretrained model's function is
preserved at the start (the original scales only the conditional gates; so does this).
Gate parameters are never quantized.

Beyond the paper (`softmax` / `gate` values proposed later for the same problem):
  softmax1     exp(x_i) / (1 + sum_j exp(x_j))  ("off by one": a head may put ~0 weight)
  sink         exp(x_i) / (exp(s_h) + sum_j exp(x_j)), s_h a learned logit per head (init 0)
  gate='elementwise'  context (B, T, H*d_head) * sigmoid(x W_g + b_g), W_g (d_model, H*d_head)
  gate_mlp2    per-head Linear(d, d) -> ReLU -> Linear(d, 1) (the original's second MLP gate)
attention_init='torch_default': Q/K/V (and OPT's out_proj) and the gate Linears start as
PyTorch's nn.Linear: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as the originals'
swapped-in attention modules; 'normal': N(0, init_std) weights, zero biases.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oqt_jax.models.config import ModelConfig
from oqt_jax.models.layers import Dense, Dropout, constrain, dtype_of, normal_init, qact

HEAD_AXES = ('batch', 'heads', 'length', 'kv')
SCORE_AXES = ('batch', 'heads', 'length', 'length_kv')


@jax.custom_jvp
def clip01(z):
  """jnp.clip(z, 0, 1) with the same derivative (1 inside, 0 outside, 1/2 on a bound), as one
  select on z: jnp.clip's derivative (through max and min, with their tie rule) costs XLA
  several passes over the array."""
  return jnp.clip(z, 0.0, 1.0)


@clip01.defjvp
def _clip01_jvp(primals, tangents):
  (z,), (dz,) = primals, tangents
  one, half, zero = (jnp.asarray(v, z.dtype) for v in (1.0, 0.5, 0.0))
  inside = (z > zero) & (z < one)
  factor = jnp.where(inside, one, jnp.where((z == zero) | (z == one), half, zero))
  return clip01(z), dz * factor


def clipped_softmax(x, gamma: float = 0.0, zeta: float = 1.0, axis: int = -1):
  """Stretched-and-clipped softmax; gradient is zero where the output is clipped."""
  p = jax.nn.softmax(x, axis=axis)
  if gamma == 0.0 and zeta == 1.0:
    return p
  return clip01((zeta - gamma) * p + gamma)


def sink_softmax(x, sink_logit=0.0, axis: int = -1):
  """exp(x_i) / (exp(s) + sum_j exp(x_j)), stably: m = max(max_j x_j, s),
  exp(x_i - m) / (exp(s - m) + sum_j exp(x_j - m)). s = 0 is softmax1 ("off by one");
  `sink_logit` broadcasts against x with `axis` reduced (keepdims)."""
  x = x.astype(jnp.float32)
  s = jnp.asarray(sink_logit, jnp.float32)
  m = jnp.maximum(jnp.max(x, axis=axis, keepdims=True), s)
  m = jax.lax.stop_gradient(m)
  e = jnp.exp(x - m)
  return e / (jnp.exp(s - m) + jnp.sum(e, axis=axis, keepdims=True))


def torch_linear_init(fan_in: int):
  """PyTorch nn.Linear's default init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def block_diagonal(w):
  """(H, a, b) per-head matrices -> the (H*a, H*b) block-diagonal matrix."""
  h, a, b = w.shape
  eye = jnp.eye(h, dtype=w.dtype)
  return (w[:, :, None, :] * eye[:, None, :, None]).reshape(h * a, h * b)


def split_heads(x, num_heads):
  """(B, T, H*d) -> (B, H, T, d)."""
  b, t, _ = x.shape
  return x.reshape(b, t, num_heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x):
  """(B, H, T, d) -> (B, T, H*d)."""
  b, h, t, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


class AttentionGate(nn.Module):
  """Computes the gate pi for the configured gate type; returns (B|1, H, T|1, 1), or
  (B, T, H*d_head) for gate='elementwise'."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h, d = cfg.num_heads, cfg.head_dim
    torch_init = cfg.attention_init == 'torch_default'
    # Weights near zero in fine-tuning mode (BERT 0.01, OPT 0.001); else the model's init
    # (normal(init_std), or PyTorch's Linear default U(+-1/sqrt(fan_in)) with torch_default).
    w_std = (0.01 if cfg.model_type == 'bert' else 0.001) if cfg.fine_tuning else cfg.init_std

    def w_init(fan_in):
      return torch_linear_init(fan_in) if torch_init and not cfg.fine_tuning else normal_init(w_std)

    def w_last_init(fan_in):   # the Linear that gives the gate logits
      if cfg.fine_tuning and cfg.gate_last_init_std >= 0.0:
        return normal_init(cfg.gate_last_init_std) if cfg.gate_last_init_std > 0 \
            else nn.initializers.zeros
      return w_init(fan_in)

    def b_init(fan_in):   # hidden biases (the last bias is logit(gate_init))
      return torch_linear_init(fan_in) if torch_init else nn.initializers.zeros

    bias0 = nn.initializers.constant(cfg.gate_bias_init)
    part = lambda init, axes: nn.with_logical_partitioning(init, axes)
    if cfg.gate == 'unconditional_per_head':
      a = self.param('alpha', part(nn.initializers.zeros, ('gate',)), (h,), jnp.float32)
      return jax.nn.sigmoid(a)[None, :, None, None]

    xf = x.astype(jnp.float32)
    if cfg.gate == 'elementwise':     # sigmoid(x W_g + b_g), W_g (d_model, H*d_head)
      dm = x.shape[-1]
      w = self.param('kernel', part(w_last_init(dm), ('embed', 'heads')), (dm, h * d),
                     jnp.float32)
      b = self.param('bias', part(bias0, ('heads',)), (h * d,), jnp.float32)
      pi = jax.nn.sigmoid(jnp.einsum('btd,de->bte', xf, w) + b)
      return pi / cfg.gate_init if cfg.fine_tuning else pi
    if cfg.gate_linear_all_features:
      w = self.param('kernel', part(w_last_init(x.shape[-1]), ('embed', 'gate')),
                     (x.shape[-1], h), jnp.float32)
      b = self.param('bias', part(bias0, ('gate',)), (h,), jnp.float32)
      logits = (jnp.einsum('btd,dh->bht', xf, w) + b[None, :, None])[..., None]
    else:
      # Per-head maps as one product with a block-diagonal matrix over the flat (B, T, H*d)
      # features (head h's block in rows h*d.., columns h*e..): the same sums (the other
      # heads' terms are exact zeros) as a batched per-head product, without the transposes
      # XLA puts around a batch dimension in the middle.
      if cfg.gate_mlp or cfg.gate_mlp2:
        d4 = d if cfg.gate_mlp2 else d // 4
        w1 = self.param('kernel1', part(w_init(d), ('gate', None, None)), (h, d, d4),
                        jnp.float32)
        b1 = self.param('bias1', part(b_init(d), ('gate', None)), (h, d4), jnp.float32)
        w2 = self.param('kernel2', part(w_last_init(d4), ('gate', None)), (h, d4), jnp.float32)
        b2 = self.param('bias2', part(bias0, ('gate',)), (h,), jnp.float32)
        hid = jax.nn.relu(jnp.einsum('btf,fg->btg', xf, block_diagonal(w1)) + b1.reshape(-1))
        logits = jnp.einsum('btg,gh->bth', hid, block_diagonal(w2[..., None])) + b2
      else:
        w = self.param('kernel', part(w_last_init(d), ('gate', None)), (h, d), jnp.float32)
        b = self.param('bias', part(bias0, ('gate',)), (h,), jnp.float32)
        logits = jnp.einsum('btf,fh->bth', xf, block_diagonal(w[..., None])) + b
      logits = jnp.swapaxes(logits, 1, 2)[..., None]      # (B, H, T, 1)
    if cfg.gate == 'conditional_per_head':
      logits = jnp.mean(logits, axis=2, keepdims=True)    # (B, H, 1, 1)
    pi = jax.nn.sigmoid(logits)
    if cfg.fine_tuning:
      pi = pi / cfg.gate_init
    return pi


class MultiHeadAttention(nn.Module):
  """Self-attention: Q/K/V projections, (clipped) softmax, optional gate, output projection.

  Args of __call__:
    x: (B, T, D) attention input.
    gate_input: (B, T, D) what the gate looks at (BERT: layer input; OPT: the pre-LN output).
    attn_mask: (B, 1, Tq, Tk) bool, True where attention is allowed.
    tok_mask: (B, T) bool token-validity mask for quantization statistics (or None).
    decode: incremental decoding with a key / value cache (collection 'cache': cached_key,
      cached_value of shape (B, H, L, d_head), L = attn_mask's last dim): x holds the t new
      tokens at positions [cache_index, cache_index + t); their keys / values are written
      there and the queries attend over the whole cache under attn_mask (B, 1, t, L). The
      numerics are those of the full forward (masked keys get probability 0).
  Quantization points: q/k/v outputs, scores 's', probabilities 'p', context 'c' (after the
  gate for BERT, before it for OPT, as the originals), output 'g'. QK^T and P.V accumulate
  in float32 (they feed the softmax and the quantizers) whatever the compute dtype.
  """
  cfg: ModelConfig
  layer: int
  quant: Any = None

  @nn.compact
  def __call__(self, x, gate_input, attn_mask, tok_mask=None, deterministic=True,
               decode=False, cache_index=None):
    cfg, i, q = self.cfg, self.layer, self.quant
    dtype = dtype_of(cfg.dtype)
    # attention_init='torch_default': the Linears the originals swap in (BERT q/k/v; OPT
    # q/k/v/out_proj) start as PyTorch's nn.Linear default.
    torch_init = lambda name: cfg.attention_init == 'torch_default' and (
        name != 'out' or cfg.model_type == 'opt')
    tinit = lambda name, fan_in: torch_linear_init(fan_in) if torch_init(name) else None
    dense = lambda name, point, axes: Dense(
        cfg.hidden_size, point=f'{point}{i}', use_bias=cfg.enable_bias, kernel_axes=axes,
        init_std=cfg.init_std, dtype=dtype, quant=q, name=name,
        kernel_init=tinit(name, cfg.hidden_size), bias_init=tinit(name, cfg.hidden_size))
    proj = lambda name, point: constrain(
        split_heads(dense(name, point, ('embed', 'heads'))(x, tok_mask), cfg.num_heads),
        HEAD_AXES)
    query, key, value = proj('query', 'q'), proj('key', 'k'), proj('value', 'v')
    if decode:
      key, value = self._cached(key, value, attn_mask.shape[-1], cache_index)

    scale = cfg.head_dim ** -0.5
    scores = jnp.einsum('bhqd,bhkd->bhqk', query, key,
                        preferred_element_type=jnp.float32) * scale
    scores = constrain(scores, SCORE_AXES)
    # Statistics mask of s / p: valid queries x valid keys (in decode, the cache's keys).
    s_mask = tok_mask
    if decode and tok_mask is not None:
      s_mask = tok_mask[:, None, :, None] & attn_mask
    scores = qact(q, self, f's{i}', scores, s_mask)
    scores = jnp.where(attn_mask, scores, jnp.finfo(jnp.float32).min)
    softmax = str(cfg.softmax).strip()
    if softmax == 'softmax1':
      probs = sink_softmax(scores, 0.0)
    elif softmax == 'sink':
      sink = self.param('sink', nn.with_logical_partitioning(nn.initializers.zeros, ('heads',)),
                        (cfg.num_heads,), jnp.float32)
      probs = sink_softmax(scores, sink[None, :, None, None])
    else:
      gamma, zeta = cfg.clip_gamma_zeta
      probs = clipped_softmax(scores, gamma, zeta)
    probs = constrain(probs, SCORE_AXES)
    if not self.is_initializing() and self.is_mutable_collection('attention'):
      self.sow('attention', 'probs', probs)   # apply(..., mutable=['attention']) reads them
      self.sow('attention', 'values', value)  # (B, H, T, d_head): oqt_jax/evaluate/analysis.py
    probs = qact(q, self, f'p{i}', probs, s_mask)
    probs = Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    context = constrain(jnp.einsum('bhqk,bhkd->bhqd', probs.astype(value.dtype), value,
                                   preferred_element_type=jnp.float32), HEAD_AXES)
    if q is None:
      context = context.astype(dtype)
    # The originals quantize the context after the gate in BERT, before it in OPT.
    c_before_gate = cfg.model_type == 'opt'
    if c_before_gate:
      context = split_heads(qact(q, self, f'c{i}', merge_heads(context), tok_mask),
                            cfg.num_heads)
    if cfg.gate != 'none':
      pi = AttentionGate(cfg, name='gate')(gate_input)
      self.sow('intermediates', 'gate_probs', pi)
      if cfg.gate == 'elementwise':            # (B, T, H*d) -> (B, H, T, d)
        pi = split_heads(pi, cfg.num_heads)
      context = constrain(context * pi.astype(context.dtype), HEAD_AXES)
    context = merge_heads(context)
    if not c_before_gate:
      context = qact(q, self, f'c{i}', context, tok_mask)
    context = constrain(context, ('batch', 'length', 'heads'))
    out = dense('out', 'g', ('heads', 'embed'))(context, tok_mask)
    return constrain(out, ('batch', 'length', 'embed'))

  def _cached(self, key, value, length, cache_index):
    """Writes the new keys / values (B, H, t, d) at cache_index; returns the whole cache."""
    b, h, _, d = key.shape
    ck = self.variable('cache', 'cached_key', jnp.zeros, (b, h, length, d), key.dtype)
    cv = self.variable('cache', 'cached_value', jnp.zeros, (b, h, length, d), value.dtype)
    idx = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    ck.value = jax.lax.dynamic_update_slice(ck.value, key.astype(ck.value.dtype),
                                            (zero, zero, idx, zero))
    cv.value = jax.lax.dynamic_update_slice(cv.value, value.astype(cv.value.dtype),
                                            (zero, zero, idx, zero))
    return ck.value, cv.value
