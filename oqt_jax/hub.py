"""Hugging Face hub access shared by the data sources, the GLUE loader, the tokenizers and the
model loaders: whether a name can load at all (decided at once, without network retries) and
`load_hf`, every failure a one-line DataError.
"""
from __future__ import annotations

import functools
import os

from oqt_jax.errors import DataError


def one_line(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return f'{type(e).__name__}: {msg[0] if msg else ""}'.rstrip(': ')


_OFF = ('1', 'on', 'yes', 'true')


def hub_offline() -> bool:
  """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, or the hub's host unreachable (checked
  once per process, 3 s at most)."""
  if any(os.environ.get(v, '').strip().lower() in _OFF
         for v in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE')):
    return True
  return not _hub_reachable()


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
  import socket  # pylint: disable=import-outside-toplevel
  import urllib.parse  # pylint: disable=import-outside-toplevel
  host = urllib.parse.urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co'))
  try:
    with socket.create_connection((host.hostname or 'huggingface.co', host.port or 443),
                                  timeout=3):
      return True
  except OSError:
    return False


def _path_like(name: str) -> bool:
  """A name only a local path can have (absolute, ./ ../ ~, more than one '/', or whose first
  component is a local folder): never a hub id."""
  if os.path.isabs(name) or name.startswith(('.', '~')) or os.sep != '/' and os.sep in name:
    return True
  parts = name.split('/')
  return len(parts) > 2 or name.endswith('/') or (len(parts) == 2 and os.path.isdir(parts[0]))


def _in_hub_cache(name: str, cache_dir: str = '') -> bool:
  try:
    from huggingface_hub import constants  # pylint: disable=import-outside-toplevel
    roots = [cache_dir] if cache_dir else []
    roots.append(constants.HF_HUB_CACHE)
  except ImportError:
    return False
  folder = 'models--' + name.replace('/', '--')
  return any(r and os.path.isdir(os.path.join(r, folder)) for r in roots)


def unreachable_name(name: str, cache_dir: str = '') -> str | None:
  """Why the checkpoint / tokenizer `name` cannot be loaded, decided at once and without
  network retries: 'no such directory' for a path-like name that does not exist, 'not a local
  directory and not in the hub cache (offline ...)' for a hub id that is not cached while the
  hub is unreachable; None when it may load (a local dir, a cached or reachable hub id)."""
  path = os.path.expanduser(name)
  if os.path.isdir(path):
    return None
  if os.path.exists(path):
    return 'is a file, expected a directory'
  if _path_like(name):
    return 'no such directory'
  if _in_hub_cache(name, cache_dir) or not hub_offline():
    return None
  return ('not a local directory and not in the hub cache (offline: no network or '
          'HF_HUB_OFFLINE=1)')


def load_hf(name: str, config_name: str | None, field: str, cache_dir: str = '',
            split: str | None = None):
  """`datasets.load_from_disk` for a save_to_disk folder, else `datasets.load_dataset`.

  Any failure becomes a one-line DataError naming `field` and the dataset.
  """
  import datasets  # pylint: disable=import-outside-toplevel
  path = os.path.expanduser(name)
  try:
    if os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f))
        for f in ('dataset_dict.json', 'state.json', 'dataset_info.json')):
      ds = datasets.load_from_disk(path)  # a save_to_disk folder
      if split is not None and isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
      return ds
    # A hub name, or a folder of data files (parquet / json / csv / txt).
    return datasets.load_dataset(path if os.path.isdir(path) else name, config_name or None,
                                 split=split, cache_dir=cache_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{field}='{name}': cannot load dataset ({one_line(e)})") from None
