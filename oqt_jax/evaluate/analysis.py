"""The outlier mechanism, measured on a checkpoint: where the outliers are and which heads
attend to them.

Per layer, on the tensor the outlier tables report (BERT: the FFN output before the residual,
`ffn_output`; OPT: the decoder-layer output, `layer_output`), over the valid tokens of the
analysed batches:
  dim_inf_norm      max |x| per hidden dimension (the per-layer x dim picture);
  threshold         OUTLIER_SIGMAS x the standard deviation of all valid entries; an entry
                    above it (in absolute value) is an outlier;
  outlier_dims      the dimensions holding outlier entries, largest inf norm first, each with
                    its inf norm and number of outlier entries;
  outlier_tokens    the tokens (strings) at which those entries occur, most frequent first,
                    with their share of the outlier entries;
  position0_share   share of the outlier entries at the first position ([CLS] / BOS).
Per head (layer l, head h), attention probabilities averaged over valid queries:
  mass_delimiter    mass on delimiter keys: special tokens ([CLS], [SEP], BOS, EOS, ...) and
                    punctuation-only tokens;
  mass_position0    mass on the first key;
  mass_outlier_tokens  mass on the keys that carry an outlier in layer l-1's tensor (the
                    attention input of layer l; None for layer 0);
  value_norm_delimiter  L2 norm of the head's value vectors at delimiter keys, weighted by
                    the head's attention mass on them (the delimiters it actually reads);
  value_norm_other  mean L2 norm of its value vectors at the other keys;
  no_op_score       mass_delimiter x (1 - value_norm_delimiter / value_norm_other), clipped at
                    0: high for a head that puts its mass on delimiters whose value is small
                    (the paper's "do nothing" head).
The heads are ranked by no_op_score in `no_op_heads`.

Tensors come from the models' sown collections: 'intermediates' (the outlier tensors) and
'attention' ('probs' (B, H, T, T) and 'values' (B, H, T, d_head), only filled when the
collection is asked for). MLM batches are analysed as the text was written: the masked /
replaced tokens are restored from the labels.
"""
from __future__ import annotations

import json
import os
import string
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

from oqt_jax import data as data_lib
from oqt_jax.evaluate import setup
from oqt_jax.evaluate.outliers import HEADLINE, MODEL_INPUTS

OUTLIER_SIGMAS = 6.0
TOP_DIMS = 8
TOP_TOKENS = 8
PUNCT = set(string.punctuation) | {'\u2019', '\u201c', '\u201d', '\u2013', '\u2014'}


def is_delimiter(tok: str, special: Iterable[str] = ()) -> bool:
  """A special token or a token made only of punctuation (word-piece '##' / BPE 'G.' marks
  stripped)."""
  if tok in set(special):
    return True
  t = tok.replace('##', '').replace('\u0120', '').replace('\u2581', '').strip()
  return bool(t) and all(c in PUNCT for c in t)


def _layers(tree: Mapping, model_type: str) -> list:
  prefix = 'encoder_layer_' if model_type == 'bert' else 'decoder_layer_'
  found = {int(k[len(prefix):]): v for k, v in tree.items() if k.startswith(prefix)}
  return [found[i] for i in sorted(found)]


def collect(model, variables, batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """One deterministic forward per batch; returns numpy arrays concatenated over batches:
  input_ids, mask (N, T); hidden [L] (N, T, D); key_mass [L] (N, H, T) (mean over valid
  queries of the probability on each key); value_norm [L] (N, H, T)."""
  mtype = model.cfg.model_type
  tensor = HEADLINE[mtype]

  @jax.jit
  def fwd(inputs):
    _, col = model.apply(variables, **inputs, deterministic=True,
                         mutable=['intermediates', 'attention'])
    mask = inputs['attention_mask'].astype(np.float32)
    out_h, out_m, out_v = [], [], []
    for lay_i, lay_a in zip(_layers(col['intermediates'], mtype),
                            _layers(col['attention'], mtype)):
      out_h.append(lay_i[tensor][0])
      p = lay_a['attention']['probs'][0]                 # (B, H, Tq, Tk)
      qm = mask[:, None, :, None]
      mass = (p * qm).sum(axis=2) / jax.numpy.maximum(qm.sum(axis=2), 1.0)
      out_m.append(mass)
      v = lay_a['attention']['values'][0]
      out_v.append(jax.numpy.sqrt(jax.numpy.sum(v.astype(np.float32) ** 2, axis=-1)))
    return out_h, out_m, out_v

  ids, masks, hid, mass, vn = [], [], [], [], []
  for b in batches:
    inputs = {k: np.asarray(b[k]) for k in MODEL_INPUTS[mtype] if k in b}
    labels = b.get('labels')
    if labels is not None and np.shape(labels) == inputs['input_ids'].shape:
      # MLM batches: the text as written (masked / replaced tokens restored from the labels)
      inputs['input_ids'] = np.where(np.asarray(labels) != -100, labels, inputs['input_ids'])
    h, m, v = jax.device_get(fwd(inputs))
    ids.append(inputs['input_ids'])
    masks.append(np.asarray(b['attention_mask']).astype(bool))
    hid.append(h), mass.append(m), vn.append(v)
  if not ids:
    raise ValueError('analysis: no batch')
  cat = lambda xs: [np.concatenate([x[i] for x in xs]).astype(np.float32)
                    for i in range(len(xs[0]))]
  return {'input_ids': np.concatenate(ids), 'mask': np.concatenate(masks),
          'hidden': cat(hid), 'key_mass': cat(mass), 'value_norm': cat(vn)}


def analyze(data: Mapping[str, Any], token_str: Callable[[int], str],
            special: Sequence[str] = (), sigmas: float = OUTLIER_SIGMAS) -> dict[str, Any]:
  """The figures (module docstring) from `collect`'s arrays; token_str(id) -> token string."""
  ids, mask = data['input_ids'], data['mask']
  vocab = {int(i): token_str(int(i)) for i in np.unique(ids)}
  delim_of = {i: is_delimiter(s, special) for i, s in vocab.items()}
  delim = np.vectorize(lambda i: delim_of[int(i)])(ids) & mask
  other = mask & ~delim
  layers, heads, prev_flags = [], [], None
  for li, x in enumerate(data['hidden']):
    xv = x[mask]                                           # (n_tok, D)
    thr = float(sigmas * xv.std())
    dim_inf = np.abs(xv).max(axis=0)
    big = np.abs(x) > thr                                  # (N, T, D)
    big &= mask[..., None]
    count_dim = big.sum(axis=(0, 1))
    dims = [int(d) for d in np.argsort(-dim_inf) if count_dim[d] > 0][:TOP_DIMS]
    tok_flags = big.any(axis=-1)                           # (N, T) tokens with an outlier
    n_entries = int(big.sum())
    counts: dict[str, int] = {}
    for n, t in zip(*np.nonzero(big.sum(axis=-1))):
      s = vocab[int(ids[n, t])]
      counts[s] = counts.get(s, 0) + int(big[n, t].sum())
    toks = sorted(counts.items(), key=lambda kv: -kv[1])[:TOP_TOKENS]
    pos0 = int(big[:, 0].sum())
    layers.append({
        'layer': li, 'max_inf_norm': float(dim_inf.max()), 'threshold': thr,
        'dim_inf_norm': [float(v) for v in dim_inf],
        'outlier_entries': n_entries,
        'outlier_dims': [{'dim': d, 'inf_norm': float(dim_inf[d]), 'entries': int(count_dim[d])}
                         for d in dims],
        'outlier_tokens': [{'token': s, 'entries': c, 'share': c / max(n_entries, 1),
                            'delimiter': is_delimiter(s, special)} for s, c in toks],
        'position0_share': pos0 / max(n_entries, 1) if n_entries else 0.0,
    })
    km, vn = data['key_mass'][li], data['value_norm'][li]   # (N, H, T)
    seq_ok = mask.any(axis=1)
    for h in range(km.shape[1]):
      m = km[:, h]
      md = float((m * delim).sum(axis=1)[seq_ok].mean())
      m0 = float(m[:, 0][seq_ok].mean())
      mo = None
      if prev_flags is not None:
        mo = float((m * prev_flags).sum(axis=1)[seq_ok].mean())
      md_w = float((m * delim).sum())     # mass-weighted: the delimiter keys the head reads
      vd = float((m * delim * vn[:, h]).sum() / md_w) if md_w > 0 else float('nan')
      vo = float(vn[:, h][other].mean()) if other.any() else float('nan')
      ratio = vd / vo if vo > 0 else float('nan')
      score = md * max(0.0, 1.0 - ratio) if np.isfinite(ratio) else 0.0
      heads.append({'layer': li, 'head': h, 'mass_delimiter': md, 'mass_position0': m0,
                    'mass_outlier_tokens': mo, 'value_norm_delimiter': vd,
                    'value_norm_other': vo, 'no_op_score': score})
    prev_flags = tok_flags
  ranked = sorted(heads, key=lambda r: -r['no_op_score'])
  return {'sigmas': sigmas, 'num_sequences': int(mask.any(axis=1).sum()),
          'num_tokens': int(mask.sum()), 'delimiter_share': float(delim.sum() / max(mask.sum(), 1)),
          'layers': layers, 'heads': heads,
          'no_op_heads': [{'layer': r['layer'], 'head': r['head'], 'no_op_score': r['no_op_score'],
                           'mass_delimiter': r['mass_delimiter']} for r in ranked[:10]],
          'delimiter_mass_mean': float(np.mean([r['mass_delimiter'] for r in heads]))}


def summary_lines(res: Mapping[str, Any], tensor: str = '') -> list[str]:
  """Readable lines: per layer the outlier dims and tokens, then the top no-op heads."""
  out = [f'outliers (|x| > {res["sigmas"]:g} std{" of " + tensor if tensor else ""}), '
         f'{res["num_tokens"]} tokens, {100 * res["delimiter_share"]:.1f}% delimiters:']
  for lay in res['layers']:
    dims = ', '.join(f'{d["dim"]} ({d["inf_norm"]:.1f})' for d in lay['outlier_dims'][:4]) or '-'
    toks = ', '.join(f'{t["token"]!r} {100 * t["share"]:.0f}%' for t in lay['outlier_tokens'][:4]) or '-'
    out.append(f'  layer {lay["layer"]}: max {lay["max_inf_norm"]:.1f}; dims {dims}; '
               f'tokens {toks}')
  out.append('heads by no-op score (mass on delimiters x (1 - their value norm / others)):')
  for r in res['no_op_heads'][:6]:
    h = next(x for x in res['heads'] if x['layer'] == r['layer'] and x['head'] == r['head'])
    out.append(f'  L{r["layer"]}H{r["head"]}: mass {h["mass_delimiter"]:.2f}, value norm '
               f'{h["value_norm_delimiter"]:.2f} vs {h["value_norm_other"]:.2f}, '
               f'score {h["no_op_score"]:.2f}')
  return out


def plot(res: Mapping[str, Any], path: str, title: str = '') -> Optional[str]:
  """analysis.png: per layer x dim inf norm (heat map), per head delimiter mass vs the ratio
  of delimiter to other value norms."""
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
  img = np.array([lay['dim_inf_norm'] for lay in res['layers']])
  im = a.imshow(img, aspect='auto', interpolation='nearest', cmap='viridis')
  a.set_xlabel('hidden dimension'), a.set_ylabel('layer')
  a.set_title('inf norm per layer x dim')
  fig.colorbar(im, ax=a)
  hs = res['heads']
  ratio = [h['value_norm_delimiter'] / h['value_norm_other'] if h['value_norm_other'] else np.nan
           for h in hs]
  sc = b.scatter([h['mass_delimiter'] for h in hs], ratio, c=[h['layer'] for h in hs],
                 cmap='plasma', s=25)
  for h, r in zip(hs, ratio):
    if h['no_op_score'] >= sorted(x['no_op_score'] for x in hs)[-min(5, len(hs))]:
      b.annotate(f'L{h["layer"]}H{h["head"]}', (h['mass_delimiter'], r), fontsize=7)
  b.set_xlabel('attention mass on delimiter tokens')
  b.set_ylabel('value norm at delimiters / at other tokens')
  b.set_title('per head')
  fig.colorbar(sc, ax=b, label='layer')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def tokenizer_strings(tok) -> tuple[Callable[[int], str], list[str]]:
  """(id -> token string, special-token strings) for an HF tokenizer (or this project's)."""
  hf = getattr(tok, 'hf', None) or getattr(tok, 'tokenizer', None) or tok
  conv = getattr(hf, 'convert_ids_to_tokens', None)
  if conv is None and hasattr(hf, 'id_to_token'):
    conv = hf.id_to_token
  # delimiters: the sequence markers ([CLS], [SEP], BOS, EOS), not [UNK] / [MASK] / padding
  special = [t for t in (getattr(hf, n, None) for n in ('cls_token', 'sep_token', 'bos_token',
                                                      'eos_token')) if isinstance(t, str)]
  if conv is None:
    return (lambda i: str(i)), special
  return (lambda i: str(conv(int(i)))), special


def analyze_model(model, variables, batches, tokenizer, out_dir: str, *, title: str = '',
                  plots_on: bool = True) -> dict[str, Any]:
  """collect + analyze; writes out_dir/analysis.json (and analysis.png)."""
  data = collect(model, variables, batches)
  token_str, special = tokenizer_strings(tokenizer)
  res = analyze(data, token_str, special)
  res['model_type'] = model.cfg.model_type
  res['tensor'] = HEADLINE[model.cfg.model_type]
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'analysis.json'), 'w') as fh:
    json.dump(res, fh, indent=1)
  if plots_on:
    plot(res, os.path.join(out_dir, 'analysis.png'), title)
  return res


def analyze_run(config, workdir: Optional[str], *, hf_model: Optional[str] = None,
                num_batches: Optional[int] = None, batch_size: Optional[int] = None,
                plots_on: bool = True) -> dict[str, Any]:
  """eval.py --analyze: the model of a workdir (or --hf_model) on its validation batches."""
  model, variables, source = setup.load_model(config, workdir, hf_model)
  config = setup.sync_config(config, model, source)
  config = setup.run_tokenizer(config, workdir)
  bs = int(batch_size or min(int(config.get('eval_batch_size', 32)), 32))
  nb = int(num_batches or 4)
  val, _ = setup.datasets(config, workdir, calib=False)
  tok = data_lib.get_tokenizer(config, workdir)
  res = analyze_model(model, variables, val.eval_batches(bs, nb), tok, workdir,
                      title=f'{model.cfg.model_type}: {os.path.basename(str(source).rstrip("/")) or source}', plots_on=plots_on)
  for line in summary_lines(res, res['tensor']):
    print(line)
  print(f'wrote {os.path.join(workdir, "analysis.json")}')
  return res
