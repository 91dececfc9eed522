"""On-disk cache of tokenized arrays: `workdir/data_cache/<key>/<name>.npy` + `meta.json`.

The key is a SHA-1 over everything the arrays depend on (the corpus fields of config.data,
the split, the tokenizer's full definition, the pipeline's format version) and nothing else,
so reruns, restarts and other hosts sharing the workdir read the arrays instead of
re-tokenizing. A cache folder is written under a private name and renamed into place, so a
reader never sees a half-written one. Arrays are opened memory-mapped (each host reads only
the rows of its own batches).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid

import numpy as np

CACHE_DIR = 'data_cache'
FORMAT_VERSION = 1


def cache_key(fields: dict) -> str:
  blob = json.dumps({'format': FORMAT_VERSION, **fields}, sort_keys=True, default=str)
  return hashlib.sha1(blob.encode('utf-8')).hexdigest()[:20]


def cache_path(workdir: str, key: str) -> str:
  return os.path.join(workdir, CACHE_DIR, key)


def load(workdir: str | None, key: str) -> dict[str, np.ndarray] | None:
  """The cached arrays (memory-mapped) or None when absent / unreadable."""
  if not workdir:
    return None
  path = cache_path(workdir, key)
  meta_path = os.path.join(path, 'meta.json')
  if not os.path.exists(meta_path):
    return None
  try:
    with open(meta_path, encoding='utf-8') as f:
      meta = json.load(f)
    return {name: np.load(os.path.join(path, f'{name}.npy'), mmap_mode='r')
            for name in meta['arrays']}
  except (OSError, ValueError, KeyError):
    return None  # damaged: rebuilt by the caller


def staging_dir(workdir: str, key: str) -> str:
  """A fresh private folder to write the arrays of `key` into before `save` commits them."""
  path = cache_path(workdir, key)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  os.makedirs(tmp)
  return tmp


def save(workdir: str | None, key: str, arrays: dict[str, np.ndarray],
         info: dict | None = None, staging: str | None = None) -> dict[str, np.ndarray]:
  """Write `arrays` under `key` (no-op without a workdir); returns the arrays to use.

  Arrays whose `<name>.npy` already exists in `staging` (written there directly, e.g. through
  a memory map) are not written again.
  """
  if not workdir:
    return arrays
  path = cache_path(workdir, key)
  tmp = staging or staging_dir(workdir, key)
  for name, arr in arrays.items():
    if not os.path.exists(os.path.join(tmp, f'{name}.npy')):
      np.save(os.path.join(tmp, f'{name}.npy'), np.ascontiguousarray(arr))
  with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
    json.dump({'arrays': sorted(arrays), 'info': info or {}}, f, indent=1, sort_keys=True,
              default=str)
  try:
    os.rename(tmp, path)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)  # written meanwhile by another process
  loaded = load(workdir, key)
  return loaded if loaded is not None else arrays


def token_dtype(vocab_size: int):
  """uint16 when every id fits (halves the cache), else int32."""
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
