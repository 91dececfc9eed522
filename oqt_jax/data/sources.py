"""Text corpora: where the raw text of every `config.data.source` comes from.

`load_texts(data_config, split)` returns the texts of one split ('train' or 'validation'):

* a `list[str]` for the local sources ('embedded', 'files'; also 'glue', where it is the
  list of all sentences, used to train a tokenizer), or
* a `datasets.Dataset` with one column 'text' for the Hugging Face sources
  ('bookcorpus_and_wiki', 'wikitext-103', 'wikitext-2', 'hub').

One item is one "document": a paragraph (embedded), a line (files, wikitext, hub rows), an
article (wiki40b). The CLM pipeline starts every document with the tokenizer's BOS; the MLM
pipeline separates documents with [SEP].

Local sources are split into train/validation deterministically: duplicates are dropped, the
texts are ordered by a SHA-1 of their content and the first ceil(p% * n) go to validation
(p = data.validation_split_percentage). The split therefore does not depend on file order or
on the training seed, and train and validation never share a text.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import math
import os
import re
import sysconfig
from typing import Any, Iterable, Iterator, Sequence

from oqt_jax.data import glue
from oqt_jax.errors import ConfigError, DataError
from oqt_jax.hub import (_hub_reachable, _in_hub_cache, _path_like, hub_offline,  # noqa: F401
                         load_hf, unreachable_name)

SOURCES = ('embedded', 'bookcorpus_and_wiki', 'wikitext-103', 'wikitext-2', 'hub', 'files',
           'glue', 'synthetic')   # synthetic: token sequences, no text (see synthetic.py)
LOCAL_SOURCES = ('embedded', 'files')
SPLITS = ('train', 'validation')

# Hub names of the paper's corpora (datasets >= 4 loads data files only, not scripts).
BOOKCORPUS = ('bookcorpus/bookcorpus', None)
WIKI40B = ('google/wiki40b', 'en')
WIKITEXT = 'Salesforce/wikitext'
WIKITEXT_CONFIGS = {'wikitext-103': 'wikitext-103-raw-v1', 'wikitext-2': 'wikitext-2-raw-v1'}

# Embedded corpus: paragraphs shorter than this are headings or fragments and are dropped.
_MIN_PARAGRAPH_CHARS = 20
# reST underlines and table borders ("*****", "===== =====", "+-----+") carry no text.
_RULE_LINE = re.compile(r'(?=(?:[\s|]*[*=\-~^"#+`]){3})[\s|*=\-~^"#+`]+')
_SPACES = re.compile(r'\s+')
_PARAGRAPH_BREAK = re.compile(r'\n[ \t]*\n')


def _get(cfg: Any, name: str, default: Any) -> Any:
  """`cfg.get(name, default)` for ConfigDicts, dicts and plain objects."""
  if hasattr(cfg, 'get'):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


# --------------------------------------------------------------------------- embedded


def _paragraphs(text: str) -> Iterator[str]:
  """Blank-line separated blocks of `text`, each joined into one line, rule lines dropped."""
  for block in _PARAGRAPH_BREAK.split(text):
    lines = [ln.strip() for ln in block.splitlines()]
    yield _SPACES.sub(' ', ' '.join(ln for ln in lines if ln and not _RULE_LINE.fullmatch(ln)))


# Parts of the standard library that hold tests, demos or vendored code, not documentation.
_SKIP_STDLIB_DIRS = ('test', 'tests', 'idlelib', 'lib2to3', 'turtledemo', 'ensurepip',
                     'site-packages', 'dist-packages', '__pycache__')


@functools.lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[str, ...]:
  """Docstrings of the standard library's modules, classes and functions (~1.6 MB).

  Read with `ast` from the source files (nothing is imported), files in sorted order.
  Parsing the whole library takes a few seconds, hence opt-in (data.embedded_docstrings).
  """
  lib = sysconfig.get_paths()['stdlib']
  out: list[str] = []
  for root, dirs, files in os.walk(lib):
    dirs[:] = sorted(d for d in dirs
                     if d not in _SKIP_STDLIB_DIRS and not d.startswith('test'))
    for name in sorted(files):
      if not name.endswith('.py'):
        continue
      try:
        with open(os.path.join(root, name), encoding='utf-8') as f:
          tree = ast.parse(f.read())
      except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        continue
      for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
          doc = ast.get_docstring(node)
          if doc:
            out.append(doc)
  return tuple(out)


def embedded_documents(include_docstrings: bool = False) -> list[str]:
  """The embedded English corpus: paragraphs of Python's `pydoc_data.topics` help texts.

  Every Python installation ships these ~460 KB of reference prose (the text behind
  `help('if')`), so the default pipeline runs without a network. Each topic is split at blank
  lines into paragraphs; the lines of a paragraph are joined with every run of whitespace
  collapsed to one space, reST rule lines and table borders are removed, and short fragments
  and duplicates are dropped (~330 KB remain). With `include_docstrings`, the paragraphs of the standard library's docstrings
  follow (about four times more text).
  """
  try:
    from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - stripped-down Python builds
    raise DataError(f'data.source=embedded: pydoc_data.topics is not available ({e})') from None
  raw = [topics.topics[name] for name in sorted(topics.topics)]
  if include_docstrings:
    raw.extend(stdlib_docstrings())
  seen: set[str] = set()
  docs: list[str] = []
  for text in raw:
    for para in _paragraphs(text):
      if len(para) < _MIN_PARAGRAPH_CHARS or para in seen:
        continue
      seen.add(para)
      docs.append(para)
  return docs


def split_documents(docs: Sequence[str], validation_percentage: float,
                    split: str) -> list[str]:
  """Deterministic content-hash split of `docs` (deduplicated) into train / validation.

  Keeps the original order inside each split. With 0 % every text is in train.
  """
  _check_split(split)
  unique = list(dict.fromkeys(docs))
  n_val = math.ceil(len(unique) * float(validation_percentage) / 100.0)
  if validation_percentage > 0 and len(unique) > 1:
    n_val = min(max(n_val, 1), len(unique) - 1)
  else:
    n_val = 0
  digests = [hashlib.sha1(t.encode('utf-8')).digest() for t in unique]
  order = sorted(range(len(unique)), key=digests.__getitem__)
  val = set(order[:n_val])
  want_val = split == 'validation'
  return [t for i, t in enumerate(unique) if (i in val) == want_val]


# --------------------------------------------------------------------------- files


def _expand_files(spec: str, field: str) -> list[str]:
  """Comma-separated files / folders -> sorted list of .txt paths; errors name the path."""
  paths: list[str] = []
  for entry in (s.strip() for s in spec.split(',')):
    if not entry:
      continue
    path = os.path.expanduser(entry)
    if os.path.isdir(path):
      found = sorted(
          os.path.join(root, f)
          for root, _, files in os.walk(path) for f in files if f.endswith('.txt'))
      if not found:
        raise DataError(f"{field}: folder '{path}' contains no .txt files")
      paths.extend(found)
    elif os.path.isfile(path):
      paths.append(path)
    else:
      raise DataError(f"{field}: no such file or directory: '{path}'")
  if not paths:
    raise DataError(f"{field}='{spec}': names no files")
  return paths


def read_text_files(spec: str, field: str = 'data.files') -> list[str]:
  """Non-empty lines (right-stripped) of every file named by `spec`, in order."""
  lines: list[str] = []
  for path in _expand_files(spec, field):
    try:
      with open(path, encoding='utf-8') as f:
        text = f.read()
    except UnicodeDecodeError as e:
      raise DataError(f"{field}: cannot decode '{path}' as UTF-8 ({e.reason} at byte "
                      f'{e.start})') from None
    except OSError as e:
      raise DataError(f"{field}: cannot read '{path}' ({e.strerror or e})") from None
    lines.extend(ln.rstrip() for ln in text.splitlines() if ln.strip())
  if not lines:
    raise DataError(f"{field}='{spec}': the files contain no text")
  return lines


# --------------------------------------------------------------------------- HF datasets


def carve_split(ds, validation_percentage: float, split: str, seed: int = 0):
  """Train / validation split of a single `datasets.Dataset`.

  A fixed-seed permutation picks ceil(p% * n) validation rows; both splits keep the
  original row order. The seed is fixed (not the training seed) so that the validation set
  does not move when the training seed does.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  _check_split(split)
  n = len(ds)
  n_val = min(math.ceil(n * float(validation_percentage) / 100.0), max(n - 1, 0))
  perm = np.random.default_rng(seed).permutation(n)
  idx = np.sort(perm[:n_val] if split == 'validation' else perm[n_val:])
  return ds.select(idx)


def _pick_split(dd, split: str, validation_percentage: float, field: str, name: str):
  """DatasetDict / Dataset -> the requested split, carving validation from train if absent."""
  import datasets  # pylint: disable=import-outside-toplevel
  if isinstance(dd, datasets.Dataset):
    return carve_split(dd, validation_percentage, split)
  if split in dd:
    return dd[split]
  if 'train' in dd:
    return carve_split(dd['train'], validation_percentage, split)
  raise DataError(f"{field}='{name}': has no '{split}' or 'train' split "
                  f'(splits: {", ".join(dd.keys())})')


def _text_only(ds, column: str, field: str, name: str, num_workers: int):
  """Keep `column` as 'text' and drop empty / whitespace-only rows."""
  if column not in ds.column_names:
    raise DataError(f"data.text_column='{column}': not a column of {field}='{name}' "
                    f'(columns: {", ".join(ds.column_names)})')
  ds = ds.select_columns([column])
  if column != 'text':
    ds = ds.rename_column(column, 'text')
  return ds.filter(lambda b: [bool(t and t.strip()) for t in b['text']], batched=True,
                   num_proc=_num_proc(num_workers, len(ds)), desc='drop empty texts')


def _num_proc(num_workers: int, n: int) -> int | None:
  return num_workers if num_workers > 1 and n >= 10_000 else None


_WIKI40B_MARKER = re.compile(r'^_START_(ARTICLE|SECTION|PARAGRAPH)_$')


def clean_wiki40b(text: str) -> str:
  """wiki40b markup -> plain text: drop the _START_*_ marker lines, _NEWLINE_ -> newline."""
  lines = [ln for ln in text.split('\n') if ln and not _WIKI40B_MARKER.match(ln.strip())]
  return '\n'.join(lines).replace('_NEWLINE_', '\n')


def _wiki40b(split: str, cache_dir: str, num_workers: int):
  name, cfg = WIKI40B
  ds = load_hf(name, cfg, 'data.source=bookcorpus_and_wiki: wiki40b', cache_dir, split=split)
  ds = ds.select_columns(['text'])
  return ds.map(lambda b: {'text': [clean_wiki40b(t) for t in b['text']]}, batched=True,
                num_proc=_num_proc(num_workers, len(ds)), desc='clean wiki40b')


# --------------------------------------------------------------------------- entry point


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected 'train' or 'validation'")


def load_texts(data_config, split: str):
  """Texts of `split` ('train' | 'validation') of `data_config.source`.

  Returns list[str] (embedded, files, glue sentences) or a datasets.Dataset with a 'text'
  column (Hugging Face sources). Raises ConfigError for an unknown source and DataError
  (one line, naming the field and file / dataset) when the data cannot be read or is empty.
  """
  _check_split(split)
  source = _get(data_config, 'source', 'embedded')
  pct = float(_get(data_config, 'validation_split_percentage', 5))
  cache_dir = _get(data_config, 'cache_dir', '') or ''
  num_workers = int(_get(data_config, 'num_workers', 1) or 1)

  if source == 'embedded':
    texts = split_documents(
        embedded_documents(bool(_get(data_config, 'embedded_docstrings', False))), pct, split)
  elif source == 'files':
    spec = _get(data_config, 'files', '')
    val_spec = _get(data_config, 'validation_files', '')
    if val_spec:
      texts = (read_text_files(spec) if split == 'train'
               else read_text_files(val_spec, 'data.validation_files'))
    else:
      texts = split_documents(read_text_files(spec), pct, split)
  elif source == 'synthetic':
    raise ConfigError("data.source='synthetic': generates token ids (oqt_jax/data/synthetic.py), "
                      'it has no texts')
  elif source == 'glue':
    texts = glue.glue_sentences(data_config, split)
  elif source in WIKITEXT_CONFIGS:
    ds = load_hf(WIKITEXT, WIKITEXT_CONFIGS[source], f'data.source={source}', cache_dir,
                 split=split)
    return _nonempty(_text_only(ds, 'text', f'data.source={source}', WIKITEXT, num_workers),
                     f'data.source={source}', split)
  elif source == 'bookcorpus_and_wiki':
    if split == 'train':
      import datasets  # pylint: disable=import-outside-toplevel
      name, cfg = BOOKCORPUS
      books = load_hf(name, cfg, 'data.source=bookcorpus_and_wiki: bookcorpus', cache_dir,
                      split='train').select_columns(['text'])
      ds = datasets.concatenate_datasets([books, _wiki40b('train', cache_dir, num_workers)])
    else:
      ds = _wiki40b('validation', cache_dir, num_workers)
    return _nonempty(_text_only(ds, 'text', 'data.source', source, num_workers),
                     'data.source=bookcorpus_and_wiki', split)
  elif source == 'hub':
    name = _get(data_config, 'hub_name', '')
    if not name:
      raise ConfigError("data.hub_name='': required when data.source='hub'")
    dd = load_hf(name, _get(data_config, 'hub_config', '') or None, 'data.hub_name',
                 cache_dir)
    ds = _pick_split(dd, split, pct, 'data.hub_name', name)
    ds = _text_only(ds, _get(data_config, 'text_column', 'text') or 'text', 'data.hub_name',
                    name, num_workers)
    return _nonempty(ds, f"data.hub_name='{name}'", split)
  else:
    raise ConfigError(f'data.source={source!r}: unknown; expected one of {", ".join(SOURCES)}')
  return _nonempty(texts, f'data.source={source}', split)


def _nonempty(texts, what: str, split: str):
  if len(texts) == 0:
    raise DataError(f'{what}: the {split} split is empty')
  return texts


def iter_lines(texts, batch_size: int = 1000) -> Iterator[str]:
  """Every non-empty line of every text (list or datasets.Dataset), for tokenizer training."""
  if isinstance(texts, (list, tuple)):
    chunks: Iterable = (texts,)
  else:
    chunks = (b['text'] for b in texts.iter(batch_size=batch_size))
  for chunk in chunks:
    for text in chunk:
      for line in text.split('\n'):
        if line.strip():
          yield line


def texts_fingerprint(texts) -> str:
  """SHA-1 of the content of a list of texts (order-sensitive)."""
  h = hashlib.sha1()
  for t in texts:
    b = t.encode('utf-8')
    h.update(len(b).to_bytes(8, 'little'))
    h.update(b)
  return h.hexdigest()
