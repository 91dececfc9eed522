"""Language-modelling datasets: BERT masked LM and OPT causal LM over a token stream.

Tokenized corpus ("stream"): every document is tokenized once and the results are
concatenated into one 1-D token array, with `offsets[i]:offsets[i+1]` the span of document i.

* MLM (BERT): a document contributes its tokens without special tokens followed by one
  [SEP] (the document separator).
* CLM (OPT): a document contributes the tokenizer's own encoding with special tokens, which
  for OPT is `</s>` (BOS) + tokens: every document starts with BOS, as in OPT pretraining.

Examples:

* CLM: block i = stream[i*T : (i+1)*T], T = data.block_size (HF run_clm's group_texts; the
  tail shorter than a block is dropped). labels = input_ids (the loss shifts), mask all ones.
* MLM, grouped (default): sequence i = [CLS] + stream[i*(T-2) : (i+1)*(T-2)] + [SEP],
  T = data.max_seq_length: every sequence is full (no padding) and framed like BERT's.
* MLM, line by line (`data.line_by_line=True`): sequence i = [CLS] + document i (cut to T-2
  tokens) + [SEP], padded with [PAD] (attention_mask 0).

MLM masking (dynamic, as HF's DataCollatorForLanguageModeling): each non-special, non-padding
token is selected with probability data.mlm_probability; a selected token becomes [MASK] with
probability 0.8, a random token with 0.1, stays itself with 0.1; labels hold the original id
at selected positions and -100 elsewhere. Random replacements are drawn from the non-special
ids (HF also draws special ids; a random [PAD] or [CLS] mid-text teaches nothing).
The randomness of a row comes from `np.random.default_rng((seed, 0, g))` with g its global
stream position (see sampling.py): masking is a pure function of (seed, step, row) and does
not depend on the number of processes. Eval rows use `(seed, 1, example_index)`: fixed masks.
"""
from __future__ import annotations

import os
import shutil

import numpy as np

from oqt_jax.data import cache, sampling, sources
from oqt_jax.data import tokenizer as tokenizer_lib
from oqt_jax.errors import DataError

IGNORE_INDEX = -100
_TRAIN_STREAM = 0
_EVAL_STREAM = 1
_CHUNK = 4096  # texts per tokenizer call


# --------------------------------------------------------------------------- tokenization


def _encode(tok, texts: list[str], add_special: bool) -> list[list[int]]:
  return tok(list(texts), add_special_tokens=add_special, return_attention_mask=False,
             return_token_type_ids=False, verbose=False)['input_ids']


def _doc_ids(tok, texts: list[str], kind: str) -> list[np.ndarray]:
  """Token arrays of documents as they enter the stream (empty documents dropped)."""
  out = []
  if kind == 'mlm':
    sep = tok.sep_token_id
    for ids in _encode(tok, texts, add_special=False):
      if ids:
        out.append(np.asarray(ids + [sep]))
  else:
    n_special = tok.num_special_tokens_to_add(pair=False)
    for ids in _encode(tok, texts, add_special=True):
      if len(ids) > n_special:
        out.append(np.asarray(ids))
  return out


def tokenize_stream(texts, tok, kind: str, num_workers: int = 1,
                    out_dir: str | None = None) -> dict[str, np.ndarray]:
  """Texts (list or datasets.Dataset with 'text') -> {'tokens': 1-D, 'offsets': n_docs + 1}.

  With `out_dir`, the token array is written straight to `out_dir/tokens.npy` (memory-mapped)
  so corpora larger than memory can be cached.
  """
  dtype = cache.token_dtype(len(tok))
  if isinstance(texts, (list, tuple)):
    docs: list[np.ndarray] = []
    for i in range(0, len(texts), _CHUNK):
      docs.extend(_doc_ids(tok, texts[i:i + _CHUNK], kind))
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    tokens = (np.concatenate(docs).astype(dtype) if docs else np.zeros((0,), dtype))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return {'tokens': tokens, 'offsets': offsets}

  # datasets.Dataset: tokenize with Dataset.map (parallel, cached by datasets), then copy
  # the variable-length rows into one array.
  def fn(batch):
    ids = _doc_ids(tok, batch['text'], kind)
    return {'ids': [d.tolist() for d in ids], 'n': [len(d) for d in ids]}

  num_proc = num_workers if num_workers > 1 and len(texts) >= 10_000 else None
  mapped = texts.map(fn, batched=True, batch_size=1000, remove_columns=texts.column_names,
                     num_proc=num_proc, desc=f'tokenize ({kind})')
  lengths = np.asarray(mapped.with_format('numpy')['n'], dtype=np.int64)
  total = int(lengths.sum())
  if out_dir and total > 0:  # (an empty file cannot be memory-mapped)
    tokens = np.lib.format.open_memmap(os.path.join(out_dir, 'tokens.npy'), mode='w+',
                                       dtype=dtype, shape=(total,))
  else:
    tokens = np.empty((total,), dtype)
  pos = 0
  for b in mapped.iter(batch_size=10_000):
    if b['ids']:
      chunk = np.concatenate([np.asarray(x, dtype) for x in b['ids']])
      tokens[pos:pos + len(chunk)] = chunk
      pos += len(chunk)
  assert pos == total, (pos, total)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  return {'tokens': tokens, 'offsets': offsets}


def _source_fields(data_config, split: str, texts) -> dict:
  """What the tokenized stream of this split depends on, besides the tokenizer."""
  d = data_config
  source = d.get('source', 'embedded')
  fields = {'source': source, 'split': split}
  if texts is not None:  # local sources: the content itself
    fields['texts_sha1'] = sources.texts_fingerprint(texts)
    return fields
  fields.update(
      hub_name=d.get('hub_name', ''), hub_config=d.get('hub_config', ''),
      text_column=d.get('text_column', 'text'),
      validation_split_percentage=float(d.get('validation_split_percentage', 5)))
  name = os.path.expanduser(fields['hub_name'] or '')
  if source == 'hub' and name and os.path.isdir(name):  # local dataset folder: its files
    fields['local_files'] = sorted(
        (os.path.relpath(os.path.join(root, f), name), st.st_size, st.st_mtime_ns)
        for root, _, files in os.walk(name) for f in files
        for st in [os.stat(os.path.join(root, f))])
  return fields


def token_stream(config, tok, split: str, workdir: str | None, kind: str):
  """The (cached) token stream of `split`: {'tokens', 'offsets'}; tokenizes on a miss."""
  d = config.data
  texts = None
  if d.get('source', 'embedded') in sources.LOCAL_SOURCES:
    texts = sources.load_texts(d, split)  # cheap; its content is part of the key
  key = cache.cache_key({'what': 'lm_stream', 'kind': kind,
                         'tokenizer': tokenizer_lib.tokenizer_fingerprint(tok),
                         **_source_fields(d, split, texts)})
  hit = cache.load(workdir, key)
  if hit is not None:
    return hit
  if texts is None:
    texts = sources.load_texts(d, split)
  num_workers = int(d.get('num_workers', 1) or 1)
  staging = None
  if workdir and not isinstance(texts, (list, tuple)):
    # Large corpora: write the tokens straight into the cache's staging folder.
    staging = cache.staging_dir(workdir, key)
    try:
      arrays = tokenize_stream(texts, tok, kind, num_workers, out_dir=staging)
      if isinstance(arrays['tokens'], np.memmap):
        arrays['tokens'].flush()
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
  else:
    arrays = tokenize_stream(texts, tok, kind, num_workers)
  info = {'split': split, 'kind': kind, 'num_tokens': int(len(arrays['tokens'])),
          'num_documents': int(len(arrays['offsets']) - 1)}
  return cache.save(workdir, key, arrays, info, staging=staging)


# --------------------------------------------------------------------------- masking


def mlm_mask(input_ids: np.ndarray, eligible: np.ndarray, u_select: np.ndarray,
             u_kind: np.ndarray, random_ids: np.ndarray, mlm_probability: float,
             mask_id: int) -> tuple[np.ndarray, np.ndarray]:
  """BERT masking given uniform draws: (masked inputs, labels with -100 where not selected).

  u_select, u_kind: uniforms in [0, 1) of the shape of input_ids; random_ids: replacement ids.
  Selected = eligible & u_select < p; of those u_kind < 0.8 -> [MASK], < 0.9 -> random,
  else unchanged.
  """
  selected = eligible & (u_select < mlm_probability)
  labels = np.where(selected, input_ids, IGNORE_INDEX).astype(np.int32)
  inputs = np.where(selected & (u_kind < 0.8), mask_id, input_ids)
  inputs = np.where(selected & (u_kind >= 0.8) & (u_kind < 0.9), random_ids, inputs)
  return inputs.astype(np.int32), labels


# --------------------------------------------------------------------------- dataset


class LMDataset(sampling.IndexedDataset):
  """MLM or CLM examples over a token stream; see the module docstring.

  Attributes: kind ('mlm' | 'clm'), seq_len, num_examples, num_tokens, tokenizer.
  """

  def __init__(self, tokens: np.ndarray, offsets: np.ndarray, *, kind: str, seq_len: int,
               tokenizer, seed: int, mlm_probability: float = 0.15,
               line_by_line: bool = False):
    if kind not in ('mlm', 'clm'):
      raise ValueError(f'kind={kind!r}')
    self.kind = kind
    self.seq_len = int(seq_len)
    self.tokenizer = tokenizer
    self.seed = int(seed)
    self.mlm_probability = float(mlm_probability)
    self.line_by_line = bool(line_by_line) and kind == 'mlm'
    self.tokens = tokens
    self.offsets = offsets
    self.num_tokens = int(len(tokens))
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if kind == 'mlm':
      self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
      self.mask_id = tokenizer.mask_token_id
      if None in (self.cls_id, self.sep_id, self.mask_id):
        raise DataError('data.tokenizer: MLM needs [CLS], [SEP] and [MASK] tokens; the '
                        'tokenizer lacks one')
      self.special_ids = np.asarray(tokenizer_lib.special_token_ids(tokenizer), np.int64)
      vocab = np.arange(len(tokenizer))
      self.replacement_ids = vocab[~np.isin(vocab, self.special_ids)]
    if self.line_by_line:
      self.num_examples = int(len(offsets) - 1)
    else:
      self.chunk = self.seq_len - 2 if kind == 'mlm' else self.seq_len
      self.num_examples = self.num_tokens // self.chunk

  def __len__(self) -> int:
    return self.num_examples

  # -- unmasked rows ------------------------------------------------------------------
  def rows(self, indices) -> dict[str, np.ndarray]:
    """Unmasked examples `indices`: {'input_ids', 'attention_mask'} (n, seq_len) int32."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= self.num_examples):
      raise IndexError(f'example index out of range [0, {self.num_examples})')
    n, t = len(idx), self.seq_len
    if self.line_by_line:
      ids = np.full((n, t), self.pad_id, np.int32)
      mask = np.zeros((n, t), np.int32)
      for r, i in enumerate(idx):
        body = np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1] - 1])[:t - 2]
        k = len(body) + 2
        ids[r, 0], ids[r, 1:k - 1], ids[r, k - 1] = self.cls_id, body, self.sep_id
        mask[r, :k] = 1
      return {'input_ids': ids, 'attention_mask': mask}
    gather = idx[:, None] * self.chunk + np.arange(self.chunk)[None, :]
    body = np.asarray(self.tokens[gather.reshape(-1)]).reshape(n, self.chunk).astype(np.int32)
    if self.kind == 'mlm':
      body = np.concatenate([np.full((n, 1), self.cls_id, np.int32), body,
                             np.full((n, 1), self.sep_id, np.int32)], axis=1)
    return {'input_ids': body, 'attention_mask': np.ones((n, t), np.int32)}

  # -- batches --------------------------------------------------------------------------
  def _finish(self, idx: np.ndarray, keys: list[tuple], valid: np.ndarray | None):
    out = self.rows(idx)
    ids, attn = out['input_ids'], out['attention_mask']
    if self.kind == 'clm':
      labels = ids.copy()
    else:
      n, t = ids.shape
      u_sel = np.empty((n, t))
      u_kind = np.empty((n, t))
      rnd = np.empty((n, t), np.int64)
      for r, key in enumerate(keys):
        rng = np.random.default_rng(key)
        u_sel[r], u_kind[r] = rng.random((2, t))
        rnd[r] = rng.integers(0, len(self.replacement_ids), t)
      eligible = (attn == 1) & ~np.isin(ids, self.special_ids)
      ids, labels = mlm_mask(ids, eligible, u_sel, u_kind, self.replacement_ids[rnd],
                             self.mlm_probability, self.mask_id)
      out['token_type_ids'] = np.zeros_like(ids)
    if valid is not None:
      labels[~valid] = IGNORE_INDEX
    out['input_ids'] = ids
    out['labels'] = labels.astype(np.int32)
    return out

  def batch(self, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    """Training batch at `step` (per-process `batch_size` rows); pure in (seed, step, process)."""
    pos = sampling.global_positions(step, batch_size, process_index, process_count)
    idx = sampling.train_indices(self.seed, pos, self.num_examples)
    keys = [(self.seed, _TRAIN_STREAM, int(g)) for g in pos]
    return self._finish(idx, keys, None)

  def _eval_rows(self, indices, valid) -> dict[str, np.ndarray]:
    """Fixed masking per example (seed, eval stream, index), whatever the batch size."""
    keys = [(self.seed, _EVAL_STREAM, int(i)) for i in indices]
    return self._finish(indices, keys, None if valid.all() else valid)
