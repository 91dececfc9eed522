"""Text generation for OPT models with a key / value cache, compiled once.

  out = models.generate(model, variables, input_ids, max_new_tokens=20)             # greedy
  out = models.generate(model, variables, ids, 20, temperature=0.8, top_k=40, seed=1)
  out = models.generate(qmodel, qvariables, ids, 20)      # a calibrated model (quant.calibrate)

Returns (B, P + max_new_tokens) int32: the prompt followed by the new tokens. Prompts of
different lengths are left-padded, with `attention_mask` (B, P) marking the real tokens (as
HF); positions count real tokens only, so padding changes nothing.

How: one jitted function per (model, shapes, max_new_tokens, top_k, greedy). The prompt runs
once through the model in decode mode (its keys / values fill the cache of length
L = P + max_new_tokens), then a `lax.fori_loop` feeds one token per step; every layer keeps
the attention module's numerics (clipped softmax, gates, quantizers), so the logits equal those
of the full forward over the sequence so far.
  temperature == 0: greedy (argmax, first maximum on ties, as torch);
  temperature > 0: sampling from softmax(logits / temperature), restricted to the top_k
  logits when top_k > 0, with jax.random keys from `seed`.
With eos_token_id, a row that produced it continues with pad_token_id (HF's behaviour).
A calibrated model with frozen ranges decodes exactly as its full forward; with quant.dynamic
the activation ranges come from each step's own tokens (and the cache), so they differ from a
full forward's.
A gate averaged over the whole sequence (conditional_per_head) is not causal: earlier tokens'
states change with every new token, so such models cannot use a cache and are refused.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from oqt_jax.errors import ConfigError


def _check(model, input_ids, max_new_tokens, temperature, top_k):
  cfg = model.cfg
  if cfg.model_type != 'opt' or cfg.resolved_head != 'clm':
    raise ConfigError(f'generate: needs an OPT causal-LM model (model_type=opt, head=clm), '
                      f'got model_type={cfg.model_type!r}, head={cfg.resolved_head!r}')
  if cfg.gate == 'conditional_per_head':
    raise ConfigError("generate: model.gate='conditional_per_head' averages the gate over the "
                      'whole sequence (not causal), so it cannot decode with a cache')
  if int(max_new_tokens) < 1:
    raise ConfigError(f'max_new_tokens={max_new_tokens}: must be >= 1')
  if float(temperature) < 0:
    raise ConfigError(f'temperature={temperature}: must be >= 0 (0 = greedy)')
  if int(top_k) < 0:
    raise ConfigError(f'top_k={top_k}: must be >= 0 (0 = no restriction)')
  if input_ids.ndim != 2 or input_ids.shape[1] < 1:
    raise ConfigError(f'generate: input_ids must be (batch, length>=1), got {input_ids.shape}')
  total = input_ids.shape[1] + int(max_new_tokens)
  if total > cfg.max_position_embeddings:
    room = cfg.max_position_embeddings - input_ids.shape[1]
    raise ConfigError(f'max_new_tokens={max_new_tokens}: prompt length {input_ids.shape[1]} + '
                      f'{max_new_tokens} = {total} exceeds the model\'s position table '
                      f'(max_position_embeddings={cfg.max_position_embeddings}); '
                      + (f'at most {room} new tokens' if room > 0 else
                         'the prompt alone fills it'))


def check_generation(model, prompt_length: int, max_new_tokens: int, temperature: float = 0.0,
                     top_k: int = 0) -> None:
  """The checks of `generate` without generating: ConfigError naming the setting (a model
  that cannot generate, a length beyond the position table, a bad temperature / top_k)."""
  _check(model, np.zeros((1, max(int(prompt_length), 1)), np.int32), max_new_tokens,
         temperature, top_k)


def _pick(logits, key, temperature, *, greedy: bool, top_k: int):
  """Next tokens (B,) from the last position's logits (B, V)."""
  logits = logits.astype(jnp.float32)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _compiled(model, max_new_tokens: int, top_k: int, greedy: bool,
              eos_token_id: Optional[int], pad_token_id: int):
  """jit(variables, input_ids, attention_mask, temperature, key) -> (B, P + N) tokens."""

  def run(variables, input_ids, prompt_mask, temperature, key):
    b, p = input_ids.shape
    n = max_new_tokens
    variables = {k: v for k, v in variables.items() if k not in ('cache', 'intermediates')}
    mask = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones((b, n), jnp.int32)], 1)
    tokens = jnp.concatenate([input_ids.astype(jnp.int32),
                              jnp.full((b, n), pad_token_id, jnp.int32)], 1)

    def step(ids, index, cache):
      v = dict(variables)
      if cache is not None:
        v['cache'] = cache
      out, upd = model.apply(v, ids, attention_mask=mask, decode=True, cache_index=index,
                             mutable=['cache'])
      return out.logits[:, -1], upd['cache']

    logits, cache = step(input_ids.astype(jnp.int32), 0, None)   # prefill: the whole prompt
    done = jnp.zeros((b,), bool)

    def body(i, carry):
      tokens, cache, logits, done = carry
      nxt = _pick(logits, jax.random.fold_in(key, i), temperature, greedy=greedy, top_k=top_k)
      if eos_token_id is not None:
        nxt = jnp.where(done, pad_token_id, nxt)
        done = done | (nxt == eos_token_id)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], p + i, axis=1)
      # The cache update for the last new token is not needed; computing it keeps one body.
      logits, cache = step(nxt[:, None], p + i, cache)
      return tokens, cache, logits, done

    tokens, _, _, _ = jax.lax.fori_loop(0, n, body, (tokens, cache, logits, done))
    return tokens

  return jax.jit(run)


def generate(model, variables, input_ids, max_new_tokens: int = 20, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, *, attention_mask=None,
             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None):
  """Continues `input_ids` (B, P) by max_new_tokens tokens; see the module docstring.

  model / variables: an OPT causal LM (models.build / hf.load) or a calibrated qmodel with
  its qvariables. attention_mask (B, P): 1 for real tokens, 0 for left padding.
  Returns a (B, P + max_new_tokens) int32 array.
  """
  input_ids = jnp.asarray(input_ids)
  _check(model, input_ids, max_new_tokens, temperature, top_k)
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  attention_mask = jnp.asarray(attention_mask)
  if attention_mask.shape != input_ids.shape:
    raise ConfigError(f'generate: attention_mask shape {attention_mask.shape} != input_ids '
                      f'shape {input_ids.shape}')
  if not bool(np.all(np.asarray(attention_mask)[:, -1])):
    raise ConfigError('generate: prompts must be left-padded (attention_mask[:, -1] == 1)')
  pad = model.cfg.pad_token_id if pad_token_id is None else int(pad_token_id)
  greedy = float(temperature) == 0.0
  fn = _compiled(model, int(max_new_tokens), int(top_k), greedy,
                 None if eos_token_id is None else int(eos_token_id), int(pad))
  temp = jnp.float32(1.0 if greedy else temperature)
  return fn(dict(variables), input_ids, attention_mask, temp, jax.random.PRNGKey(int(seed)))


__all__ = ['generate']
