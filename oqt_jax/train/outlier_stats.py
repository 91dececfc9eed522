"""Outlier statistics and perplexity, computed inside one jitted forward per batch (the
periodic evaluation of training and eval.py; reports: oqt_jax/evaluate/outliers.py).

The models `sow` the tensors the paper measures into 'intermediates':
  BERT  per layer: ffn_output (FFN output before the residual), ffn_residual (LN input),
        ffn_ln_output
  OPT   per layer: attn_output (out_proj), attn_ln_output (self_attn_layer_norm), ffn_output
        (fc2), ffn_ln_output (final_layer_norm), layer_output; final_ln_output (decoder)

Per tensor x (B, T, D) and token mask (B, T), both statistics per SEQUENCE, as the originals
(validate_mlm.py / validate_clm.py flatten each sequence, x.view(B, -1)):
  inf norm   max |x| over the sequence's valid tokens and all D, averaged over sequences;
  kurtosis   Pearson kurtosis of the sequence's valid entries (valid T x D values):
             mean((x - mu)^4) / (std^4 + 1e-6), mu / std the mean and (population, ddof=0)
             standard deviation over those entries (a normal gives 3), averaged over
             sequences. Per sequence, not per token: a per-token kurtosis is bounded by D
             (768), below the paper's avg kurtosis figures (3076 for BERT-base).
Kurtosis is taken of KURTOSIS_TENSORS: BERT ffn_output and ffn_ln_output (not the residual
sum, whose inf norm only is reported), OPT all its tensors (final_ln_output included).
Summary: max_inf_norm = max over layers of the paper's tensor (BERT ffn_output, OPT
layer_output); max_inf_norm_any = max over all tensors; avg_kurtosis / max_kurtosis = mean /
max over the kurtosis tensors of every layer. perplexity = exp(sum CE / tokens) over the
labelled tokens (MLM: labels != -100; CLM: labels shifted by one).

Sequences whose labels are all -100 (the eval iterator's filler rows) are left out of the
outlier statistics as well.

Deliberate differences from the originals:
  - padding tokens never count (the originals' hooks saw whole padded sequences; their
    grouped-text eval sets have no padding, so the figures agree there);
  - std with ddof=0 (the originals used torch's unbiased std: a relative difference of
    about 2/(T D), i.e. 2e-5 at T D = 98304);
  - kurtosis over every eval batch (the originals stopped after 257 (BERT) / 101 (OPT)
    batches);
  - OPT fc2 / final_layer_norm are measured per sequence like the other tensors (in the
    originals' HF version the FFN ran on (B*T, D), so those two were per token);
  - perplexity weights every token equally (the originals averaged per-batch mean losses;
    identical for equal-sized CLM blocks).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from oqt_jax.data.sampling import pad_batch   # filler rows: mask 0, labels -100
from oqt_jax.train import losses

TENSORS = {
    'bert': ('ffn_output', 'ffn_residual', 'ffn_ln_output'),
    'opt': ('attn_output', 'attn_ln_output', 'ffn_output', 'ffn_ln_output', 'layer_output'),
}
GLOBAL_TENSORS = {'bert': (), 'opt': ('final_ln_output',)}
KURTOSIS_TENSORS = {
    'bert': ('ffn_output', 'ffn_ln_output'),
    'opt': TENSORS['opt'] + GLOBAL_TENSORS['opt'],
}
HEADLINE = {'bert': 'ffn_output', 'opt': 'layer_output'}
KURTOSIS_EPS = 1e-6
IGNORE = -100


# ---- per-tensor statistics (pure, jittable) -------------------------------------------------
def inf_norm_per_sequence(x, mask):
  """(B,) max |x| over each sequence's valid tokens and all features (0 for empty rows)."""
  a = jnp.abs(x.astype(jnp.float32))
  a = jnp.where(mask[..., None], a, 0.0)
  return jnp.max(a, axis=(1, 2))


def kurtosis_per_row(x, eps: float = KURTOSIS_EPS):
  """(B, T) Pearson kurtosis of every token row over the feature axis.

  A per-token diagnostic; the reported metric is `kurtosis_per_sequence` (the originals').
  """
  x = x.astype(jnp.float32)
  mu = jnp.mean(x, axis=-1, keepdims=True)
  d = x - mu
  var = jnp.mean(d * d, axis=-1)
  m4 = jnp.mean(d ** 4, axis=-1)
  return m4 / (var * var + eps)


def kurtosis_per_sequence(x, mask, eps: float = KURTOSIS_EPS):
  """(B,) Pearson kurtosis of each sequence's valid entries (valid tokens x all features).

  Sequences without a valid token give 0.
  """
  x = x.astype(jnp.float32)
  m = jnp.broadcast_to(mask.astype(bool)[..., None], x.shape)
  n = jnp.maximum(jnp.sum(m, axis=(1, 2)).astype(jnp.float32), 1.0)
  mu = jnp.sum(jnp.where(m, x, 0.0), axis=(1, 2)) / n
  d = jnp.where(m, x - mu[:, None, None], 0.0)
  var = jnp.sum(d * d, axis=(1, 2)) / n
  m4 = jnp.sum(d ** 4, axis=(1, 2)) / n
  return m4 / (var * var + eps)


def tensor_sums(x, tok_mask, seq_weight, kurtosis: bool = True):
  """Sums to accumulate over sequences: inf norm (sum, max), #sequences, kurtosis sum."""
  tok_mask = tok_mask.astype(bool) & (seq_weight[:, None] > 0)
  inf = inf_norm_per_sequence(x, tok_mask)
  seq_valid = jnp.any(tok_mask, axis=1)
  out = {
      'inf_sum': jnp.sum(jnp.where(seq_valid, inf, 0.0)),
      'inf_max': jnp.max(jnp.where(seq_valid, inf, 0.0)),
      'n_seq': jnp.sum(seq_valid.astype(jnp.float32)),
  }
  if kurtosis:
    out['kurt_sum'] = jnp.sum(jnp.where(seq_valid, kurtosis_per_sequence(x, tok_mask), 0.0))
  return out


def _kurtosis_of(name: str, model_type: str) -> bool:
  return name.split('/')[-1] in KURTOSIS_TENSORS[model_type]


def collect_tensors(intermediates: Mapping, model_type: str) -> dict[str, Any]:
  """{'L{i}/{tensor}': array, 'final_ln_output': array} from a sown 'intermediates' tree."""
  out = {}
  prefix = 'encoder_layer_' if model_type == 'bert' else 'decoder_layer_'
  for key, sub in intermediates.items():
    if key.startswith(prefix):
      i = int(key[len(prefix):])
      for t in TENSORS[model_type]:
        if t in sub:
          out[f'L{i}/{t}'] = sub[t][0]
    elif key in GLOBAL_TENSORS[model_type]:
      out[key] = sub[0]
  return out


def sequence_weight(batch_labels, attention_mask):
  """1 for sequences that count, 0 for filler rows (all labels -100)."""
  if batch_labels is None or batch_labels.ndim != 2:
    return jnp.any(attention_mask.astype(bool), axis=1).astype(jnp.float32)
  return jnp.any(batch_labels != IGNORE, axis=1).astype(jnp.float32)


# ---- the jitted evaluation step ---------------------------------------------------------------
MODEL_INPUTS = {'bert': ('input_ids', 'attention_mask', 'token_type_ids'),
                'opt': ('input_ids', 'attention_mask')}


@functools.lru_cache(maxsize=8)
def make_eval_step(model, return_tensors: bool = True):
  """jit(variables, batch) -> (sums, tensors): one forward with everything measured; the
  measured tensors are outputs only with return_tensors (they cost memory at scale)."""
  mtype = model.cfg.model_type
  head = model.cfg.resolved_head

  def step(variables, batch):
    inputs = {k: batch[k] for k in MODEL_INPUTS[mtype] if k in batch}
    mask = batch['attention_mask']
    labels = batch.get('labels')
    if head == 'clm' and mtype == 'opt' and labels is not None:
      inputs['loss_labels'] = labels   # the LM head and its loss chunk by chunk
    out, state = model.apply(variables, **inputs, mutable=['intermediates'])
    tensors = collect_tensors(state['intermediates'], mtype)
    w = sequence_weight(labels if head in ('mlm', 'clm') else None, mask)
    sums = {name: tensor_sums(x, mask, w, kurtosis=_kurtosis_of(name, mtype))
            for name, x in tensors.items()}
    if out.lm_loss is not None:
      sums['_loss'] = {'ce_sum': out.lm_loss[0], 'n_tokens': out.lm_loss[1]}
    elif head in ('mlm', 'clm', 'cls') and labels is not None and out.logits is not None:
      ce, n = losses.loss_for_head(head, out.logits, batch)   # the training loss
      sums['_loss'] = {'ce_sum': ce, 'n_tokens': n}
    return sums, (tensors if return_tensors else None)
  return jax.jit(step)


def accumulate(acc, sums):
  if acc is None:
    return sums
  def add(path, a, b):
    return jnp.maximum(a, b) if path[-1].key == 'inf_max' else a + b
  return jax.tree_util.tree_map_with_path(add, acc, sums)


def finalize(acc, model_type: str, num_layers: int) -> dict:
  """Host-side metrics dict from the accumulated sums."""
  acc = jax.device_get(acc)
  per_layer = []
  tensors = {}
  for name, s in acc.items():
    if name == '_loss':
      continue
    inf = float(s['inf_sum'] / s['n_seq']) if s['n_seq'] else float('nan')
    tensors[name] = {'inf_norm': inf, 'inf_norm_max': float(s['inf_max'])}
    if 'kurt_sum' in s:
      tensors[name]['kurtosis'] = (float(s['kurt_sum'] / s['n_seq']) if s['n_seq']
                                   else float('nan'))
  for i in range(num_layers):
    row = {'layer': i}
    for t in TENSORS[model_type]:
      if f'L{i}/{t}' in tensors:
        row[t] = tensors[f'L{i}/{t}']
    per_layer.append(row)
  headline = [tensors[f'L{i}/{HEADLINE[model_type]}']['inf_norm'] for i in range(num_layers)
              if f'L{i}/{HEADLINE[model_type]}' in tensors]
  kurts = [v['kurtosis'] for v in tensors.values() if 'kurtosis' in v]
  infs = [v['inf_norm'] for v in tensors.values()]
  out = {
      'max_inf_norm': max(headline) if headline else float('nan'),
      'max_inf_norm_tensor': HEADLINE[model_type],
      'max_inf_norm_any': max(infs) if infs else float('nan'),
      'avg_kurtosis': float(np.mean(kurts)) if kurts else float('nan'),
      'max_kurtosis': max(kurts) if kurts else float('nan'),
      'per_layer': per_layer,
      'global': {k: v for k, v in tensors.items() if not k.startswith('L')},
  }
  if '_loss' in acc:
    n = float(acc['_loss']['n_tokens'])
    loss = float(acc['_loss']['ce_sum']) / n if n else float('nan')
    out.update(loss=loss, perplexity=math.exp(loss) if n and loss < 700 else float('inf'),
               num_tokens=int(n))
  else:
    out.update(loss=None, perplexity=None, num_tokens=0)
  return out


def evaluate(model, variables, batches: Iterable[Mapping[str, np.ndarray]], *,
             num_batches: Optional[int] = None, progress: bool = False, desc: str = 'eval',
             keep_first: bool = False):
  """Outlier statistics + perplexity of `model` over `batches`; one compile.

  Returns the metrics dict (see finalize); with keep_first also (metrics, first) where first
  = (tensors, attention_mask) of the first batch on the host, for histograms.
  """
  step = make_eval_step(model, return_tensors=keep_first)
  variables = {k: v for k, v in dict(variables).items() if k != 'intermediates'}
  it = iter(batches)
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(it, total=num_batches, desc=desc, unit='batch')
  acc, rows, first = None, None, None
  for b, batch in enumerate(it):
    if num_batches is not None and b >= num_batches:
      break
    batch = {k: np.asarray(v) for k, v in batch.items() if v is not None}
    rows = rows or next(iter(batch.values())).shape[0]
    batch = pad_batch(batch, rows)
    sums, tensors = step(variables, batch)
    acc = accumulate(acc, sums)
    if keep_first and first is None:
      first = (jax.device_get(tensors), np.asarray(batch['attention_mask']))
  if acc is None:
    raise ValueError('evaluate: no batches')
  metrics = finalize(acc, model.cfg.model_type, model.cfg.num_layers)
  return (metrics, first) if keep_first else metrics
