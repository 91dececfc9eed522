"""Tokenizers: a pretrained one by name / folder, or one trained on the corpus and cached.

`get_tokenizer(config, workdir)` (oqt_jax.data.pipeline; also `oqt_jax.data.get_tokenizer`):

* `config.data.tokenizer` non-empty: `AutoTokenizer.from_pretrained(name)` (hub name or local
  folder, `config.data.cache_dir` as cache).
* empty: train a tokenizer with the `tokenizers` library on the lines of the train split,
  `config.data.tokenizer_vocab_size` entries, and save it to `workdir/tokenizer/`. A later call
  with the same workdir loads that folder instead of training (a stamp file records what it
  was trained for; a different request raises ConfigError rather than silently training a
  different vocabulary under an existing checkpoint).

Trained tokenizers (ids fixed by the order of the special tokens):

* BERT (model_type 'bert'): lowercasing BPE with a word-start marker (metaspace '▁') after
  BERT's normalizer, punctuation split; `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4;
  encodes "[CLS] A [SEP]" and "[CLS] A [SEP] B [SEP]" (token types 0 / 1). Not WordPiece:
  the tokenizers library's WordPiece (and '##'-prefixed BPE) trainers pick different vocabularies
  in different processes (hash-order tie breaking); this one, with an explicit sorted initial
  alphabet, gives the same ids in every run, so runs from scratch reproduce each other.
* OPT (model_type 'opt'): byte-level BPE, `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3; like OPT,
  `</s>` is both BOS and EOS and is prepended to every text; nothing is appended.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid

from oqt_jax import hub
from oqt_jax.errors import ConfigError, DataError

TOKENIZER_DIR = 'tokenizer'
STAMP_FILE = 'oqt_tokenizer.json'

BERT_SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
OPT_SPECIAL_TOKENS = ('<s>', '<pad>', '</s>', '<unk>')


def tokenizer_kind(config) -> str:
  """'bert_bpe' for BERT, 'bytelevel_bpe' for OPT (by config.model.model_type)."""
  model_type = config.model.get('model_type', 'bert')
  if model_type == 'bert':
    return 'bert_bpe'
  if model_type == 'opt':
    return 'bytelevel_bpe'
  raise ConfigError(f"model.model_type={model_type!r}: expected 'bert' or 'opt'")


def _wrap(tokenizer_object, kind: str, model_max_length: int):
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  if kind == 'bert_bpe':
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, pad_token='[PAD]', unk_token='[UNK]',
        cls_token='[CLS]', sep_token='[SEP]', mask_token='[MASK]',
        model_max_length=model_max_length, padding_side='right')
  return PreTrainedTokenizerFast(
      tokenizer_object=tokenizer_object, bos_token='</s>', eos_token='</s>',
      pad_token='<pad>', unk_token='<unk>', additional_special_tokens=None,
      model_max_length=model_max_length, padding_side='right')


def train_tokenizer(lines, kind: str, vocab_size: int, model_max_length: int = 512):
  """Train a BERT (lowercase BPE) or OPT (byte-level BPE) tokenizer on an iterable of lines.

  Feed lines or sentences, not whole documents: the trainers count words per input string,
  and a handful of huge strings yields an almost empty vocabulary.
  """
  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
  from tokenizers import processors, trainers
  if kind == 'bert_bpe':
    lines = list(lines)
    tok = Tokenizer(models.BPE(unk_token='[UNK]'))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True,
                                                handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(),
                                                 pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    alphabet = sorted({c for line in lines
                       for piece, _ in tok.pre_tokenizer.pre_tokenize_str(
                           tok.normalizer.normalize_str(line)) for c in piece})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BERT_SPECIAL_TOKENS),
        initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    cls, sep = tok.token_to_id('[CLS]'), tok.token_to_id('[SEP]')
    tok.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
        special_tokens=[('[CLS]', cls), ('[SEP]', sep)])
  elif kind == 'bytelevel_bpe':
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(OPT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    bos = tok.token_to_id('</s>')
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single='</s> $A', pair='</s> $A </s> $B',
                                      special_tokens=[('</s>', bos)]),
    ])
  else:
    raise ValueError(f'unknown tokenizer kind {kind!r}')
  return _wrap(tok, kind, model_max_length)


def _stamp(config) -> dict:
  d = config.data
  return {
      'kind': tokenizer_kind(config),
      'tokenizer_vocab_size': int(d.get('tokenizer_vocab_size', 2048)),
      'source': d.get('source', 'embedded'),
      'hub_name': d.get('hub_name', ''),
      'hub_config': d.get('hub_config', ''),
      'text_column': d.get('text_column', 'text'),
      'files': d.get('files', ''),
      'glue_task': d.get('glue_task', ''),
      'validation_split_percentage': float(d.get('validation_split_percentage', 5)),
      'embedded_docstrings': bool(d.get('embedded_docstrings', False)),
  }


def _check_stamp(path: str, want: dict) -> None:
  stamp_path = os.path.join(path, STAMP_FILE)
  if not os.path.exists(stamp_path):
    return  # a tokenizer put there by hand: use it as it is
  try:
    with open(stamp_path, encoding='utf-8') as f:
      have = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"'{stamp_path}': unreadable tokenizer stamp ({e})") from None
  for key, value in want.items():
    if key in have and have[key] != value:
      field = 'model.model_type' if key == 'kind' else f'data.{key}'
      raise ConfigError(
          f'{field}: {path} holds a tokenizer trained for {key}={have.get(key)!r}, the config '
          f'asks {value!r}; use a new workdir or delete that folder')


def _load_dir(path: str, field: str, cache_dir: str = ''):
  why = hub.unreachable_name(path, cache_dir)
  if why:
    raise DataError(f"{field}='{path}': {why}")
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  try:
    tok = AutoTokenizer.from_pretrained(path, cache_dir=cache_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{field}='{path}': cannot load tokenizer ({hub.one_line(e)})") from None
  if not getattr(tok, 'is_fast', False):
    raise DataError(f"{field}='{path}': not a fast (Rust) tokenizer")
  if tok.pad_token is None and tok.eos_token is not None:
    tok.pad_token = tok.eos_token
  return tok


def load_tokenizer(config, workdir: str | None, train_lines):
  """The tokenizer of `config` once config.data is validated (get_tokenizer in
  oqt_jax.data.pipeline): config.data.tokenizer by name, else the workdir's trained one, else
  one trained on `train_lines()` (the lines of the train split; called only then) and saved
  to the workdir."""
  d = config.data
  name = d.get('tokenizer', '')
  if name:
    tok = _load_dir(os.path.expanduser(name), 'data.tokenizer', d.get('cache_dir', ''))
    check_tokenizer(tok, f"data.tokenizer='{name}'")
    return tok

  want = _stamp(config)
  max_len = int(config.model.get('max_position_embeddings', 512))
  path = os.path.join(workdir, TOKENIZER_DIR) if workdir else None
  if path and os.path.exists(os.path.join(path, 'tokenizer.json')):
    _check_stamp(path, want)
    return _load_dir(path, 'workdir tokenizer')

  tok = train_tokenizer(train_lines(), want['kind'], want['tokenizer_vocab_size'], max_len)
  if path is None:
    return tok
  # Write to a private folder, then rename: concurrent processes (multi-host) never see a
  # half-written tokenizer, and all of them end up loading the same folder.
  os.makedirs(workdir, exist_ok=True)
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  tok.save_pretrained(tmp)
  with open(os.path.join(tmp, STAMP_FILE), 'w', encoding='utf-8') as f:
    json.dump(want, f, indent=1, sort_keys=True)
  try:
    os.rename(tmp, path)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
  _check_stamp(path, want)
  return _load_dir(path, 'workdir tokenizer')


def check_tokenizer(tok, field: str, vocab_size: int | None = None) -> None:
  """DataError when `tok` cannot serve a model: no ordinary token (only special ones: MLM
  masking would have no replacement token to draw), or (with vocab_size, the model's
  embedding rows) ids beyond the embedding table."""
  n = len(tok)
  special = set(special_token_ids(tok))
  if n - len(special) <= 0:
    raise DataError(f'{field}: the tokenizer has only special tokens ({n}); it cannot encode '
                    'text')
  if vocab_size is not None and n > int(vocab_size):
    raise DataError(f'{field}: the tokenizer has {n} tokens, the model\'s embedding table '
                    f'{vocab_size} rows (ids up to {n - 1} would fall outside it): the '
                    'tokenizer does not belong to this model')


def tokenizer_fingerprint(tok) -> str:
  """SHA-1 of the tokenizer's full definition (vocab, merges, normalizer, post-processor)."""
  h = hashlib.sha1(tok.backend_tokenizer.to_str().encode('utf-8'))
  h.update(repr(sorted(tok.all_special_ids)).encode())
  return h.hexdigest()


def special_token_ids(tok) -> list[int]:
  return sorted({int(i) for i in tok.all_special_ids if i is not None})
