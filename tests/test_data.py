"""Tests of oqt_jax.data: corpora, tokenizers, MLM / CLM / GLUE batches, caching, errors.

No network: the embedded corpus, .txt files and `datasets` folders written here, and a
stand-in for `datasets.load_dataset` for the hub-only sources.
"""
import os

import datasets
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from configs import base
from oqt_jax import data
from oqt_jax.data import lm, sampling, sources
from oqt_jax.data import tokenizer as tokenizer_lib
from oqt_jax.errors import ConfigError, DataError


def make_config(model_type='bert', **data_fields):
  c = base.get_config()
  c.model.model_type = model_type
  c.model.pad_token_id = 0 if model_type == 'bert' else 1
  c.data.max_seq_length = 64
  c.data.block_size = 128
  for k, v in data_fields.items():
    if k in c.data:
      setattr(c.data, k, v)
    else:  # fields read with .get() that base.py does not declare
      with c.data.unlocked():
        c.data[k] = v
  return c


@pytest.fixture(scope='module')
def bert(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('bert'))
  config = make_config('bert')
  tok = data.get_tokenizer(config, workdir)
  ds = data.build_dataset(config, tok, 'train', workdir)
  return config, workdir, tok, ds


@pytest.fixture(scope='module')
def opt(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('opt'))
  config = make_config('opt')
  tok = data.get_tokenizer(config, workdir)
  ds = data.build_dataset(config, tok, 'train', workdir)
  return config, workdir, tok, ds


def unmasked(batch):
  """Original ids of an MLM batch: labels where selected, the inputs elsewhere."""
  return np.where(batch['labels'] != -100, batch['labels'], batch['input_ids'])


# --------------------------------------------------------------------------- corpus


def test_embedded_corpus_is_real_text_split_deterministically():
  config = make_config()
  train = data.load_texts(config.data, 'train')
  val = data.load_texts(config.data, 'validation')
  assert isinstance(train, list) and all(isinstance(t, str) for t in train)
  assert len(train) > 1000 and sum(map(len, train)) > 200_000
  assert 0.03 < len(val) / (len(train) + len(val)) < 0.07
  assert not set(train) & set(val)
  assert train == data.load_texts(config.data, 'train')
  assert val == data.load_texts(config.data, 'validation')
  words = ' '.join(train).lower().split()
  counts = dict(zip(*np.unique(words, return_counts=True)))
  assert counts['the'] == max(counts.values()), 'English prose: "the" is the commonest word'
  assert len(counts) > 5000
  letters = sum(ch.isalpha() for ch in ''.join(train))
  assert letters / sum(map(len, train)) > 0.6
  # No reST rule lines / table borders, no runs of spaces.
  assert not any('|=====' in t or '=====|' in t or '  ' in t for t in train)
  # A larger validation share contains the smaller one (hash order), still disjoint.
  val10 = data.load_texts(make_config(validation_split_percentage=10).data, 'validation')
  assert set(val) < set(val10) and len(val10) > 1.5 * len(val)


def test_split_documents_dedups_and_is_order_independent():
  docs = [f'document number {i}' for i in range(200)] + ['document number 3']
  a = sources.split_documents(docs, 10, 'validation')
  b = sources.split_documents(list(reversed(docs)), 10, 'validation')
  assert sorted(a) == sorted(b) and len(a) == 20
  train = sources.split_documents(docs, 10, 'train')
  assert len(train) == 180 and not set(train) & set(a)


# --------------------------------------------------------------------------- tokenizers


def test_trained_bert_tokenizer(bert, monkeypatch):
  config, workdir, tok, _ = bert
  assert len(tok) == config.data.tokenizer_vocab_size == 2048
  ids = {t: tok.convert_tokens_to_ids(t) for t in data.BERT_SPECIAL_TOKENS}
  assert ids == {'[PAD]': 0, '[UNK]': 1, '[CLS]': 2, '[SEP]': 3, '[MASK]': 4}
  assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 2, 3, 4)
  sentence = 'the list is sorted in place and the dictionary keeps its insertion order'
  enc = tok('The List is sorted in place and the dictionary keeps its insertion order')
  assert enc['input_ids'][0] == 2 and enc['input_ids'][-1] == 3
  assert 1 not in enc['input_ids']  # no [UNK] for ordinary English
  assert tok.decode(enc['input_ids'], skip_special_tokens=True) == sentence
  pair = tok('first part', 'second part', return_token_type_ids=True)
  assert pair['input_ids'].count(3) == 2 and set(pair['token_type_ids']) == {0, 1}

  # Cached: a second call loads workdir/tokenizer and does not train.
  path = os.path.join(workdir, 'tokenizer', 'tokenizer.json')
  mtime = os.path.getmtime(path)

  def no_training(*a, **k):
    raise AssertionError('retrained a cached tokenizer')

  monkeypatch.setattr(tokenizer_lib, 'train_tokenizer', no_training)
  again = data.get_tokenizer(config, workdir)
  assert os.path.getmtime(path) == mtime
  assert again.get_vocab() == tok.get_vocab()
  assert again(sentence)['input_ids'] == tok(sentence)['input_ids']
  # The cache refuses a different request instead of silently reusing / retraining.
  other = make_config('bert', tokenizer_vocab_size=4096)
  with pytest.raises(ConfigError, match='data.tokenizer_vocab_size'):
    data.get_tokenizer(other, workdir)


def test_trained_opt_tokenizer(opt):
  config, _, tok, _ = opt
  assert len(tok) == 2048
  ids = {t: tok.convert_tokens_to_ids(t) for t in data.OPT_SPECIAL_TOKENS}
  assert ids == {'<s>': 0, '<pad>': 1, '</s>': 2, '<unk>': 3}
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 2, 1)
  assert config.model.pad_token_id == tok.pad_token_id
  text = 'Naïve café — 3.5 €;  x = [i**2 for i in range(10)]\n\tdone.'
  enc = tok(text)['input_ids']
  assert enc[0] == 2 and enc.count(2) == 1  # BOS prepended, nothing appended
  assert tok.decode(enc[1:]) == text  # byte-level: lossless
  assert tok.decode(enc, skip_special_tokens=True) == text


def test_pretrained_tokenizer_dir_and_bad_name(bert, tmp_path):
  _, workdir, tok, _ = bert
  config = make_config('bert', tokenizer=os.path.join(workdir, 'tokenizer'))
  loaded = data.get_tokenizer(config, None)
  assert loaded.get_vocab() == tok.get_vocab()
  missing = str(tmp_path / 'no_such_tokenizer')
  with pytest.raises(DataError, match='data.tokenizer') as e:
    data.get_tokenizer(make_config('bert', tokenizer=missing), None)
  assert '\n' not in str(e.value)


# --------------------------------------------------------------------------- MLM


def _mlm_stats(ds, steps, batch_size):
  special = np.asarray(tokenizer_lib.special_token_ids(ds.tokenizer))
  sel = elig = masked = rand = same = 0
  for step in steps:
    b = ds.batch(step, batch_size)
    assert set(b) == {'input_ids', 'attention_mask', 'labels', 'token_type_ids'}
    for v in b.values():
      assert v.shape == (batch_size, ds.seq_len) and v.dtype == np.int32
    orig = ds.rows(ds.batch_indices(step, batch_size))
    ids, attn = orig['input_ids'], orig['attention_mask']
    np.testing.assert_array_equal(b['attention_mask'], attn)
    assert not b['token_type_ids'].any()
    selected = b['labels'] != -100
    eligible = (attn == 1) & ~np.isin(ids, special)
    assert not (selected & ~eligible).any(), 'special or padding token selected'
    np.testing.assert_array_equal(b['labels'][selected], ids[selected])
    # Unselected positions are untouched.
    np.testing.assert_array_equal(b['input_ids'][~selected], ids[~selected])
    sel += selected.sum()
    elig += eligible.sum()
    masked += (selected & (b['input_ids'] == ds.mask_id)).sum()
    same += (selected & (b['input_ids'] == ids)).sum()
    changed = selected & (b['input_ids'] != ids) & (b['input_ids'] != ds.mask_id)
    rand += changed.sum()
    assert not np.isin(b['input_ids'][changed], special).any()
  return sel / elig, masked / sel, rand / sel, same / sel, elig


def test_mlm_masking_statistics(bert):
  config, _, _, ds = bert
  assert ds.kind == 'mlm' and ds.seq_len == config.data.max_seq_length
  b = ds.batch(0, 4)
  orig = ds.rows(ds.batch_indices(0, 4))['input_ids']
  assert (orig[:, 0] == 2).all() and (orig[:, -1] == 3).all()  # [CLS] ... [SEP]
  p, mask, rand, same, n = _mlm_stats(ds, range(40), 32)
  assert n > 70_000
  # Binomial standard deviations: ~0.0013 (selection), ~0.004 (80 %), ~0.003 (10 %).
  assert abs(p - 0.15) < 0.008, p
  assert abs(mask - 0.8) < 0.02, mask
  assert abs(rand - 0.1) < 0.015, rand
  assert abs(same - 0.1) < 0.015, same
  assert b['labels'].dtype == np.int32


def test_mlm_probability_is_honoured(bert):
  config, workdir, tok, _ = bert
  c = make_config('bert', mlm_probability=0.4)
  ds = data.build_dataset(c, tok, 'train', workdir)
  p, mask, _, _, _ = _mlm_stats(ds, range(10), 32)
  assert abs(p - 0.4) < 0.015 and abs(mask - 0.8) < 0.02


def test_mlm_line_by_line_pads_and_never_masks_padding(bert):
  _, workdir, tok, _ = bert
  c = make_config('bert', line_by_line=True)
  ds = data.build_dataset(c, tok, 'train', workdir)
  assert ds.num_examples == len(data.load_texts(c.data, 'train'))
  pad_seen = 0
  for step in range(20):
    b = ds.batch(step, 32)
    pad = b['attention_mask'] == 0
    pad_seen += pad.sum()
    assert (b['input_ids'][pad] == tok.pad_token_id).all()
    assert (b['labels'][pad] == -100).all()
    assert (b['input_ids'][:, 0] == tok.cls_token_id).all()
    last = b['attention_mask'].sum(1) - 1
    assert (b['input_ids'][np.arange(32), last] == tok.sep_token_id).all()
  assert pad_seen > 1000
  # Short paragraph: [CLS] + its tokens + [SEP] exactly.
  texts = data.load_texts(c.data, 'train')
  i = int(np.argmin([len(t) for t in texts]))
  want = tok(texts[i])['input_ids']
  row = ds.rows([i])
  assert row['input_ids'][0, :len(want)].tolist() == want
  assert row['attention_mask'][0].sum() == len(want)


def test_mlm_mask_function_is_exact():
  ids = np.array([[2, 10, 11, 12, 13, 3, 0, 0]])
  eligible = np.array([[0, 1, 1, 1, 1, 0, 0, 0]], bool)
  u_sel = np.array([[0.0, 0.01, 0.5, 0.1, 0.14, 0.0, 0.0, 0.0]])
  u_kind = np.array([[0.0, 0.5, 0.0, 0.85, 0.95, 0.0, 0.0, 0.0]])
  rnd = np.full_like(ids, 99)
  inputs, labels = data.mlm_mask(ids, eligible, u_sel, u_kind, rnd, 0.15, mask_id=4)
  assert inputs.tolist() == [[2, 4, 11, 99, 13, 3, 0, 0]]
  assert labels.tolist() == [[-100, 10, -100, 12, 13, -100, -100, -100]]


# --------------------------------------------------------------------------- CLM


def test_clm_blocks(opt):
  config, _, tok, ds = opt
  assert ds.kind == 'clm' and ds.seq_len == 128
  b = ds.batch(3, 8)
  assert set(b) == {'input_ids', 'attention_mask', 'labels'}
  for v in b.values():
    assert v.shape == (8, 128) and v.dtype == np.int32
  np.testing.assert_array_equal(b['labels'], b['input_ids'])
  assert (b['attention_mask'] == 1).all()
  # The blocks, in order, are the concatenation of BOS-prefixed documents.
  texts = data.load_texts(config.data, 'train')
  stream = np.concatenate([tok(t)['input_ids'] for t in texts])
  blocks = ds.rows(np.arange(ds.num_examples))['input_ids']
  assert ds.num_examples == len(stream) // 128
  np.testing.assert_array_equal(blocks.reshape(-1), stream[:ds.num_examples * 128])
  assert (stream == tok.bos_token_id).sum() == len(texts)


def test_clm_concatenation_on_files(opt, tmp_path):
  _, workdir, tok, _ = opt
  lines = [f'Line {i} of the file says something about item {i * 7}.' for i in range(60)]
  (tmp_path / 'a.txt').write_text('\n'.join(lines[:30]) + '\n\n')
  (tmp_path / 'b.txt').write_text('\n'.join(lines[30:]))
  c = make_config('opt', source='files', files=f'{tmp_path}/a.txt, {tmp_path}/b.txt',
                  validation_split_percentage=0)
  c.data.block_size = 16
  ds = data.build_dataset(c, tok, 'train', workdir)
  assert data.load_texts(c.data, 'train') == lines
  want = np.concatenate([tok(t)['input_ids'] for t in lines])
  got = ds.rows(np.arange(ds.num_examples))['input_ids'].reshape(-1)
  assert len(want) - 16 < len(got) <= len(want)
  np.testing.assert_array_equal(got, want[:len(got)])
  with pytest.raises(DataError, match='validation split is empty'):
    data.build_dataset(c, tok, 'validation', workdir)


# --------------------------------------------------------------------------- order


def test_batches_are_pure_functions_of_seed_step_process(bert):
  config, workdir, tok, ds = bert
  fresh = data.build_dataset(config, tok, 'train', workdir)      # from the cache
  uncached = data.build_dataset(config, tok, 'train', None)      # tokenized again
  for _ in range(3):
    ds.batch(11, 16)                                             # history must not matter
  for other in (fresh, uncached):
    a, b = ds.batch(5, 16), other.batch(5, 16)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(ds.batch(5, 16)['input_ids'], ds.batch(6, 16)['input_ids'])
  # A different seed gives a different order.
  c2 = make_config('bert')
  c2.seed = config.seed + 1
  other_seed = data.build_dataset(c2, tok, 'train', workdir)
  assert not np.array_equal(other_seed.batch_indices(0, 16), ds.batch_indices(0, 16))

  # Process shards: disjoint, and together exactly the global batch (masking included).
  full = ds.batch(5, 16)
  shards = [ds.batch(5, 8, p, 2) for p in range(2)]
  i0, i1 = (ds.batch_indices(5, 8, p, 2) for p in range(2))
  assert not set(i0) & set(i1)
  np.testing.assert_array_equal(np.concatenate([i0, i1]), ds.batch_indices(5, 16))
  for k in full:
    np.testing.assert_array_equal(np.concatenate([s[k] for s in shards]), full[k])


def test_epochs_visit_every_example_once(opt):
  _, _, _, ds = opt
  n, bs = ds.num_examples, 7
  steps = -(-2 * n // bs) + 1
  order = np.concatenate([ds.batch_indices(s, bs) for s in range(steps)])
  first, second = order[:n], order[n:2 * n]
  np.testing.assert_array_equal(np.sort(first), np.arange(n))
  np.testing.assert_array_equal(np.sort(second), np.arange(n))
  assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(n))


def test_eval_batches_fixed_and_complete(bert):
  config, workdir, tok, _ = bert
  ds = data.build_dataset(config, tok, 'validation', workdir)
  n, bs = ds.num_examples, 16
  assert n % bs, 'the test wants a partial last batch'
  first = list(ds.eval_batches(bs))
  second = list(ds.eval_batches(bs))
  assert len(first) == -(-n // bs)
  for a, b in zip(first, second):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert all(b['input_ids'].shape == (bs, ds.seq_len) for b in first)
  last = first[-1]
  rows_with_labels = (last['labels'] != -100).any(1)
  assert rows_with_labels[:n % bs].all() and not rows_with_labels[n % bs:].any()
  # In order, every example once, masks independent of the eval batch size.
  flat = np.concatenate([unmasked(b) for b in first])[:n]
  np.testing.assert_array_equal(flat, ds.rows(np.arange(n))['input_ids'])
  other = np.concatenate([b['input_ids'] for b in ds.eval_batches(5)])[:n]
  np.testing.assert_array_equal(np.concatenate([b['input_ids'] for b in first])[:n], other)
  assert len(list(ds.eval_batches(bs, num_batches=2))) == 2
  assert len(list(ds.eval_batches(bs, drop_remainder=True))) == n // bs
  # Eval rows are masked at the configured rate.
  sel = (np.concatenate([b['labels'] for b in first])[:n] != -100).mean()
  assert 0.1 < sel < 0.16


# --------------------------------------------------------------------------- caching


def test_tokenized_arrays_are_cached(opt, monkeypatch):
  config, workdir, tok, ds = opt
  cache_root = os.path.join(workdir, 'data_cache')
  entries = [e for e in os.listdir(cache_root) if '.tmp' not in e]
  assert entries and all(os.path.exists(os.path.join(cache_root, e, 'meta.json'))
                         for e in entries)

  def no_tokenizing(*a, **k):
    raise AssertionError('re-tokenized a cached split')

  monkeypatch.setattr(lm, 'tokenize_stream', no_tokenizing)
  again = data.build_dataset(config, tok, 'train', workdir)
  np.testing.assert_array_equal(again.batch(2, 4)['input_ids'], ds.batch(2, 4)['input_ids'])
  # The cached stream does not depend on the block size.
  c = make_config('opt')
  c.data.block_size = 64
  short = data.build_dataset(c, tok, 'train', workdir)
  assert short.num_examples == ds.num_tokens // 64
  assert isinstance(short.tokens, np.memmap) or isinstance(short.tokens.base, np.memmap)


# --------------------------------------------------------------------------- sources


def test_files_source_and_errors(bert, tmp_path):
  _, workdir, tok, _ = bert
  (tmp_path / 'one.txt').write_text('Alpha line one.\n\nAlpha line two.\n')
  folder = tmp_path / 'folder'
  (folder / 'sub').mkdir(parents=True)
  (folder / 'sub' / 'three.txt').write_text('Gamma line.\n')
  (folder / 'two.txt').write_text('Beta line.\n')
  (folder / 'notes.md').write_text('Not read.\n')
  c = make_config('bert', source='files', files=f'{tmp_path}/one.txt,{folder}',
                  validation_split_percentage=0)
  assert data.load_texts(c.data, 'train') == ['Alpha line one.', 'Alpha line two.',
                                              'Gamma line.', 'Beta line.']
  c.data.max_seq_length = 8
  ds = data.build_dataset(c, tok, 'train', workdir)
  assert ds.num_examples >= 1

  missing = str(tmp_path / 'missing.txt')
  c.data.files = f'{tmp_path}/one.txt,{missing}'
  with pytest.raises(DataError, match='missing.txt') as e:
    data.load_texts(c.data, 'train')
  assert str(e.value).startswith('data.files') and '\n' not in str(e.value)
  (tmp_path / 'empty').mkdir()
  c.data.files = str(tmp_path / 'empty')
  with pytest.raises(DataError, match='no .txt files'):
    data.load_texts(c.data, 'train')
  (tmp_path / 'blank.txt').write_text('\n  \n')
  c.data.files = str(tmp_path / 'blank.txt')
  with pytest.raises(DataError, match='no text'):
    data.load_texts(c.data, 'train')
  (tmp_path / 'latin1.txt').write_bytes('caf\xe9\n'.encode('latin-1'))
  c.data.files = str(tmp_path / 'latin1.txt')
  with pytest.raises(DataError, match='latin1.txt'):
    data.load_texts(c.data, 'train')


def test_hub_source_from_local_datasets_dir(bert, tmp_path):
  _, workdir, tok, _ = bert
  rows = [f'Row {i}: the value of item {i} is {i * i}.' for i in range(100)]
  single = tmp_path / 'single'
  datasets.Dataset.from_dict({'body': rows, 'id': list(range(100))}).save_to_disk(str(single))
  c = make_config('bert', source='hub', hub_name=str(single), text_column='body',
                  validation_split_percentage=10)
  train = data.load_texts(c.data, 'train')
  val = data.load_texts(c.data, 'validation')
  assert len(val) == 10 and len(train) == 90
  assert sorted(list(train['text']) + list(val['text'])) == sorted(rows)
  assert list(val['text']) == list(data.load_texts(c.data, 'validation')['text'])
  ds = data.build_dataset(c, tok, 'train', workdir)
  assert ds.batch(0, 2)['input_ids'].shape == (2, 64)

  c.data.text_column = 'content'
  with pytest.raises(DataError, match="data.text_column='content'"):
    data.load_texts(c.data, 'train')

  split = tmp_path / 'dict'
  datasets.DatasetDict({
      'train': datasets.Dataset.from_dict({'text': rows[:80] + ['', '   ']}),
      'validation': datasets.Dataset.from_dict({'text': rows[80:]}),
  }).save_to_disk(str(split))
  c = make_config('bert', source='hub', hub_name=str(split))
  assert list(data.load_texts(c.data, 'train')['text']) == rows[:80]  # blanks dropped
  assert list(data.load_texts(c.data, 'validation')['text']) == rows[80:]
  c.data.hub_name = str(tmp_path / 'nowhere')
  with pytest.raises(DataError, match='data.hub_name'):
    data.load_texts(c.data, 'train')


def test_hub_only_sources_call_load_dataset(monkeypatch):
  calls = []

  def fake_load_dataset(name, config_name=None, split=None, cache_dir=None):
    calls.append((name, config_name, split))
    if name == sources.WIKITEXT:
      return datasets.Dataset.from_dict({'text': ['', ' = Title = \n', ' Some text .\n', ' ']})
    if name == sources.BOOKCORPUS[0]:
      return datasets.Dataset.from_dict({'text': ['a book sentence .', '']})
    if name == sources.WIKI40B[0]:
      article = ('\n_START_ARTICLE_\nPython\n_START_PARAGRAPH_\n'
                 'Python is a language._NEWLINE_It is popular.')
      return datasets.Dataset.from_dict({'wikidata_id': ['Q1'], 'text': [article],
                                         'version_id': ['1']})
    raise AssertionError(name)

  monkeypatch.setattr(datasets, 'load_dataset', fake_load_dataset)
  c = make_config('bert', source='wikitext-2', cache_dir='/tmp/hf-cache')
  assert list(data.load_texts(c.data, 'validation')['text']) == [' = Title = \n',
                                                                  ' Some text .\n']
  assert calls[-1] == (sources.WIKITEXT, 'wikitext-2-raw-v1', 'validation')
  c = make_config('bert', source='bookcorpus_and_wiki')
  train = list(data.load_texts(c.data, 'train')['text'])
  assert train == ['a book sentence .', 'Python\nPython is a language.\nIt is popular.']
  assert list(data.load_texts(c.data, 'validation')['text']) == train[1:]
  assert calls[-1] == (sources.WIKI40B[0], 'en', 'validation')


# --------------------------------------------------------------------------- GLUE

_GLUE_ROWS = {
    'sst2': lambda i: {'sentence': f'this film is {"good" if i % 2 else "bad"} number {i}'},
    'mrpc': lambda i: {'sentence1': f'the cat sat on mat {i}',
                       'sentence2': f'a cat was sitting on mat {i}'},
    'stsb': lambda i: {'sentence1': f'a man plays guitar {i}',
                       'sentence2': f'someone plays an instrument {i}'},
    'mnli': lambda i: {'premise': f'the store opens at {i}', 'hypothesis': 'it is open'},
}


def _glue_dir(tmp_path, task, n_train=40, n_val=13):
  info = data.glue_task_info(task)

  def split(n, offset):
    rows = [_GLUE_ROWS[task](i + offset) for i in range(n)]
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    cols['label'] = ([float(i % 6) * 0.9 for i in range(n)] if info.is_regression
                     else [i % info.num_labels for i in range(n)])
    cols['idx'] = list(range(n))
    return datasets.Dataset.from_dict(cols)

  path = tmp_path / f'glue_{task}'
  datasets.DatasetDict({'train': split(n_train, 0),
                        info.validation_split: split(n_val, 1000)}).save_to_disk(str(path))
  return str(path)


@pytest.mark.parametrize('task', ['sst2', 'mrpc', 'stsb', 'mnli'])
def test_glue_from_local_dir(bert, tmp_path, task):
  _, workdir, tok, _ = bert
  c = make_config('bert', source='glue', glue_task=task, hub_name=_glue_dir(tmp_path, task))
  ds = data.build_dataset(c, tok, 'train', workdir)
  info = data.glue_task_info(task)
  assert (ds.num_labels, ds.is_regression) == (info.num_labels, info.is_regression)
  assert ds.num_labels == {'sst2': 2, 'mrpc': 2, 'stsb': 1, 'mnli': 3}[task]
  assert ds.num_examples == 40
  b = ds.batch(0, 8)
  assert set(b) == {'input_ids', 'attention_mask', 'token_type_ids', 'labels'}
  assert b['input_ids'].shape == (8, 64) and b['labels'].shape == (8,)
  assert b['labels'].dtype == (np.float32 if info.is_regression else np.int32)
  assert (b['input_ids'][:, 0] == tok.cls_token_id).all()
  assert (b['input_ids'][b['attention_mask'] == 0] == tok.pad_token_id).all()
  pair = info.sentence_keys[1] is not None
  assert b['token_type_ids'].any() == pair
  # Labels follow their rows: the training order permutes (row, label) pairs together.
  raw = datasets.load_from_disk(c.data.hub_name)['train']
  idx = ds.batch_indices(0, 8)
  np.testing.assert_allclose(b['labels'], np.asarray(raw['label'])[idx])

  val = data.build_dataset(c, tok, 'validation', workdir)
  batches = list(val.eval_batches(8))
  labels = np.concatenate([x['labels'] for x in batches])
  assert len(batches) == 2 and (labels[13:] == -100).all() and (labels[:13] != -100).all()
  m = data.glue_metrics(task, labels, labels)
  assert all(abs(m[k] - 1.0) < 1e-9 for k in info.metric_names), m


def test_glue_errors_and_metrics(bert, tmp_path):
  _, _, tok, _ = bert
  path = _glue_dir(tmp_path, 'sst2')
  c = make_config('bert', source='glue', glue_task='mrpc', hub_name=path)
  with pytest.raises(DataError, match="no column 'sentence1'"):
    data.build_dataset(c, tok, 'train')
  with pytest.raises(ConfigError, match='data.glue_task'):
    data.validate_data_config(make_config('bert', source='glue', glue_task='squad'))
  m = data.glue_metrics('mrpc', np.array([1, 1, 0, 0]), np.array([1, 0, 0, -100]))
  assert m['accuracy'] == pytest.approx(2 / 3) and m['f1'] == pytest.approx(2 / 3)
  m = data.glue_metrics('cola', np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]),
                        np.array([1, 0, 0, 0]))
  assert m['matthews_correlation'] == pytest.approx(1 / np.sqrt(3))
  m = data.glue_metrics('stsb', np.array([1.0, 2.0, 3.0, 10.0]), np.array([0.5, 1.0, 1.0, 4.0]))
  assert m['spearmanr'] == pytest.approx(np.corrcoef([1, 2, 3, 4], [1, 2.5, 2.5, 4])[0, 1])
  assert m['pearson'] == pytest.approx(np.corrcoef([1, 2, 3, 10], [0.5, 1, 1, 4])[0, 1])


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize('field,value,model_type,match', [
    ('source', 'wikipedia', 'bert', 'data.source'),
    ('mlm_probability', 0.0, 'bert', 'data.mlm_probability'),
    ('validation_split_percentage', 100, 'bert', 'data.validation_split_percentage'),
    ('tokenizer_vocab_size', 100, 'bert', 'data.tokenizer_vocab_size'),
    ('max_seq_length', 1024, 'bert', 'model.max_position_embeddings'),
    ('block_size', 4096, 'opt', 'data.block_size'),
    ('num_workers', 0, 'bert', 'data.num_workers'),
    ('hub_name', '', 'bert', 'data.hub_name'),
    ('files', '', 'bert', 'data.files'),
])
def test_validate_data_config(field, value, model_type, match):
  c = make_config(model_type)
  if field == 'hub_name':
    c.data.source = 'hub'
  if field == 'files':
    c.data.source = 'files'
  setattr(c.data, field, value)
  with pytest.raises(ConfigError, match=match) as e:
    data.validate_data_config(c)
  assert '\n' not in str(e.value) and str(e.value).startswith(f'data.{field}=')


def test_unknown_source_and_model_mismatch(bert):
  c = make_config('bert', source='wikipedia')
  with pytest.raises(ConfigError, match='data.source'):
    data.load_texts(c.data, 'train')
  config, workdir, tok, _ = bert
  c = make_config('bert')
  c.model.pad_token_id = 1
  with pytest.raises(ConfigError, match='model.pad_token_id=1'):
    data.build_dataset(c, tok, 'train', workdir)
  c = make_config('bert', tokenizer_vocab_size=1024)
  c.model.vocab_size = 1024
  with pytest.raises(ConfigError, match='model.vocab_size=1024'):
    data.build_dataset(c, tok, 'train', workdir)


def test_corpus_shorter_than_one_sequence(bert, tmp_path):
  _, _, tok, _ = bert
  (tmp_path / 'short.txt').write_text('Too short to fill a sequence.\n')
  c = make_config('bert', source='files', files=str(tmp_path / 'short.txt'),
                  validation_split_percentage=0)
  with pytest.raises(DataError, match='data.max_seq_length=64'):
    data.build_dataset(c, tok, 'train')


# --------------------------------------------------------------------------- sampling


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 50), batch=st.integers(1, 9), procs=st.integers(1, 4),
       step=st.integers(0, 30), seed=st.integers(0, 2**31))
def test_sampling_shards_partition_the_global_batch(n, batch, procs, step, seed):
  shards = [sampling.train_indices(seed, sampling.global_positions(step, batch, p, procs), n)
            for p in range(procs)]
  whole = sampling.train_indices(seed, sampling.global_positions(step, batch * procs), n)
  np.testing.assert_array_equal(np.concatenate(shards), whole)
  # The stream of positions 0 .. k*n - 1 is k permutations of range(n).
  order = sampling.train_indices(seed, np.arange(3 * n), n).reshape(3, n)
  assert all(sorted(row) == list(range(n)) for row in order)


def test_trained_tokenizers_are_identical_across_processes():
  """A fresh run of the same config gets the same token ids (the trainers' own numbering
  depends on the process), so runs from scratch reproduce each other."""
  import subprocess
  import sys
  code = ('import hashlib, json\n'
          'from oqt_jax.data import tokenizer as T, embedded_documents\n'
          'lines = [l for d in embedded_documents()[:40] for l in d.splitlines() if l.strip()]\n'
          'for kind in ("bert_bpe", "bytelevel_bpe"):\n'
          '  v = T.train_tokenizer(lines, kind, 512).get_vocab()\n'
          '  print(hashlib.md5(json.dumps(sorted(v.items())).encode()).hexdigest())\n')
  outs = [subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True).stdout for _ in range(2)]
  assert len(outs[0].split()) == 2 and outs[0] == outs[1]
