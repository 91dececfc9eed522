"""Loading and validating experiment configs (ml_collections ConfigDicts from configs/*.py)."""
from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
import tempfile
from typing import Optional, Sequence

import ml_collections

from oqt_jax.data import validate_data_config
from oqt_jax.errors import ConfigError
from oqt_jax.models.config import ModelConfig, from_config
from oqt_jax.quant import resolved
from oqt_jax.train.config import COMPUTE_DTYPES, validate_train_config


def load_config_file(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Run a configs/*.py file's get_config() (what --config does on the command line)."""
  if not os.path.exists(path):
    raise ConfigError(f'--config={path}: no such file')
  spec = importlib.util.spec_from_file_location('oqt_config', path)
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except Exception as e:
    raise ConfigError(f'--config={path}: cannot be loaded ({_exc_line(e)})') from e
  if not callable(getattr(mod, 'get_config', None)):
    raise ConfigError(f'--config={path}: does not define get_config()')
  cfg = mod.get_config()
  for key, value in (overrides or {}).items():
    node = cfg
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def model_config(config) -> ModelConfig:
  """The validated ModelConfig of an experiment config (compute dtype from config.compute_dtype)."""
  dt = config.get('compute_dtype', 'float32')
  if dt not in COMPUTE_DTYPES:
    raise ConfigError(f'compute_dtype={dt!r}: expected one of {COMPUTE_DTYPES}')
  m = config.model.to_dict()
  if config.get('compute_dtype', 'float32') != 'float32' and m.get('dtype', 'float32') == 'float32':
    m['dtype'] = config.compute_dtype
  return from_config(m)


# Fields that take more than their default's type.
MIXED_TYPES = {'quant.quant_dict': (str, dict)}


def _defaults():
  try:
    from configs import base
  except ImportError:   # the package without the repository's configs/
    return None
  return base.get_config().to_dict()


def check_types(config) -> None:
  """Every field that configs/base.py defines has its default's type (an int where the default
  is a float is fine; no NaN / Inf), so the section validators only see well-typed values:
  ConfigError('section.field=value: expected ...') otherwise."""
  defaults = _defaults()
  if defaults is None:
    return
  values = config.to_dict() if hasattr(config, 'to_dict') else dict(config)

  def walk(default, value, prefix):
    for k, d in default.items():
      if not isinstance(value, dict) or k not in value:
        continue
      v, path = value[k], f'{prefix}{k}'
      if isinstance(d, dict):
        if not isinstance(v, dict):
          raise ConfigError(f'{path}={v!r}: expected a section of fields')
        walk(d, v, path + '.')
        continue
      allowed = MIXED_TYPES.get(path)
      if allowed is not None:
        if not isinstance(v, allowed):
          raise ConfigError(f'{path}={v!r}: expected one of the types '
                            f'{", ".join(t.__name__ for t in allowed)}')
      elif isinstance(d, bool):
        if not isinstance(v, bool):
          raise ConfigError(f'{path}={v!r}: expected True or False')
      elif isinstance(d, int):
        if isinstance(v, bool) or not isinstance(v, int):
          raise ConfigError(f'{path}={v!r}: expected an integer')
      elif isinstance(d, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
          raise ConfigError(f'{path}={v!r}: expected a number')
        if not math.isfinite(v):
          raise ConfigError(f'{path}={v!r}: expected a finite number')
      elif isinstance(d, str):
        if not isinstance(v, str):
          raise ConfigError(f'{path}={v!r}: expected a string')
  walk(defaults, values, '')


def validate(config) -> ml_collections.ConfigDict:
  """Validate every section; raises ConfigError('section.field=value: why') on the first problem."""
  resolve(config)
  return config


def resolve(config) -> ml_collections.ConfigDict:
  """The door of train.py: every section validated once (ConfigError('section.field=value:
  why') on the first problem), returned as a copy whose `quant` is the read-only resolved
  QuantConfig the layers below take without checking it again."""
  check_types(config)
  model_config(config)
  validate_data_config(config)
  validate_train_config(config)
  qcfg = resolved(config.quant) if 'quant' in config else None
  config = config.copy_and_resolve_references()
  if qcfg is not None:
    with config.unlocked():
      config.quant = qcfg
  return config


# ---------------------------------------------------------------------------- workdir
def prepare_workdir(path, field: str = 'workdir') -> str:
  """Create `path` (and parents) and check that files can be written there; returns the
  absolute path. ConfigError 'workdir=PATH: why' otherwise (an existing file, /proc/x,
  a read-only or permission-denied location)."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f'{field}={path}: exists and is not a directory')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'{field}={path}: cannot be created ({e.strerror or e})') from None
  try:
    fd, probe = tempfile.mkstemp(prefix='.write_check_', dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'{field}={path}: not writable ({e.strerror or e})') from None
  return path


# ---------------------------------------------------------------------------- command line
def _exc_line(e: BaseException, limit: int = 200) -> str:
  text = ' '.join(str(e).split())
  text = text[:limit] + ('...' if len(text) > limit else '')
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def cli_error(message: str, status: int = 2):
  """Print one line `error: message` to stderr and exit (status 2)."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  sys.exit(status)


def _flag_values(argv: Sequence[str], name: str) -> list[tuple[str, str]]:
  """[(flag, value)] of `--name=V` / `--name V` / `--name.sub=V` occurrences in argv."""
  out = []
  args = list(argv[1:])
  for i, a in enumerate(args):
    if a == '--':
      break
    for prefix in ('--', '-'):
      if a.startswith(prefix + name) and a[len(prefix) + len(name):len(prefix) + len(name) + 1] \
          in ('', '=', '.'):
        flag, eq, val = a[len(prefix):].partition('=')
        if not eq and '.' not in flag:
          val = args[i + 1] if i + 1 < len(args) else ''
        out.append((flag, val))
        break
  return out


def _unknown_field_message(e: BaseException, argv, name: str) -> Optional[str]:
  """'--config.num_train_step=2: no config field 'num_train_step' (did you mean ...)'."""
  text = str(e)
  hint = None
  m = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if m:
    hint, key = m.group(1), m.group(2)
  else:
    m = re.search(r"(\w+)", text)
    if not m:
      return None
    key = m.group(1)
  for flag, val in _flag_values(argv, name):
    parts = flag.split('.')[1:]
    if key in parts:
      where = '.'.join(parts[:parts.index(key) + 1])
      msg = f'--{flag}={val}: no config field {where!r}'
      if hint:
        msg += f'; did you mean {".".join(parts[:parts.index(key)] + [hint])!r}?'
      return msg
  return None


def parse_cli_flags(argv: Sequence[str], flag_values=None, config_flag: str = 'config'):
  """absl `flags_parser` for train.py / eval.py: parses argv like absl, but every mistake in
  it (a --config file that is missing or lacks get_config(), a misspelled --config.field,
  an unknown flag, a bad value) ends as one line `error: ...` with exit status 2, no
  traceback. Use as `app.run(main, flags_parser=parse_cli_flags)`."""
  from absl import flags
  fv = flag_values if flag_values is not None else flags.FLAGS
  # ml_collections loads the file as module '<flag>_config' with SourceFileLoader.load_module,
  # which executes it into an existing module of that name: drop one left by an earlier parse
  # in this process, or its get_config() would survive a file that defines none.
  sys.modules.pop(f'{config_flag}_config', None)
  for flag, path in _flag_values(argv, config_flag):
    if flag == config_flag:
      file = path.split(':', 1)[0]
      if not file:
        cli_error(f'--{config_flag}: expects a config file (configs/*.py)')
      if not os.path.isfile(file):
        cli_error(f'--{config_flag}={path}: no such file')
  try:
    rest = fv(list(argv))
  except flags.Error as e:
    text = str(e)
    if 'Did you mean' in text or 'has no attribute' in text:
      msg = _unknown_field_message(e, argv, config_flag)
      if msg:
        cli_error(msg)
    if 'Traceback' in text:   # get_config() raised: ml_collections embeds the traceback
      last = [l.strip() for l in text.splitlines() if l.strip()][-1]
      cli_error(f'--{config_flag}={_config_path(argv, config_flag)}: cannot be loaded ({last})')
    cli_error(text)
  except (AttributeError, KeyError) as e:
    if 'get_config' in str(e):
      cli_error(f'--{config_flag}={_config_path(argv, config_flag)}: does not define '
                'get_config()')
    cli_error(_unknown_field_message(e, argv, config_flag) or
              f'--{config_flag}: {_exc_line(e)}')
  except Exception as e:   # the config file itself raised
    cli_error(f'--{config_flag}={_config_path(argv, config_flag)}: cannot be loaded '
              f'({_exc_line(e)})')
  if config_flag in fv:
    value = fv[config_flag].value
    if type(value).__name__ == '_ErrorConfig':   # ml_collections defers load errors
      err = object.__getattribute__(value, '_error')
      cli_error(f'--{config_flag}={_config_path(argv, config_flag)}: cannot be loaded '
                f'({_exc_line(err)})')
    if value is None and fv[config_flag].present:
      cli_error(f'--{config_flag}={_config_path(argv, config_flag)}: get_config() returned None')
  return rest


def split_late_overrides(argv: Sequence[str], name: str = 'config'):
  """(argv without them, [(field, value)]) of `--config.FIELD=VALUE` flags given without a
  `--config` file (eval.py builds its config itself then; `apply_overrides` sets them)."""
  args = list(argv)
  if any(flag == name for flag, _ in _flag_values(args, name)):
    return args, []
  keep, late = args[:1], []
  rest = args[1:]
  i = 0
  while i < len(rest):
    a = rest[i]
    if a == '--':
      keep += rest[i:]
      break
    if a.startswith(f'--{name}.'):
      field, eq, value = a[len(name) + 3:].partition('=')
      if not eq:
        value = rest[i + 1] if i + 1 < len(rest) else ''
        i += 1
      late.append((field, value))
    else:
      keep.append(a)
    i += 1
  return keep, late


def _parse_value(text: str, current, flag: str):
  import ast
  if isinstance(current, bool):
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ConfigError(f'{flag}: expected True or False')
  if isinstance(current, (int, float)):
    try:
      return type(current)(text) if isinstance(current, float) or '.' not in text \
          else float(text)
    except ValueError:
      raise ConfigError(f'{flag}: expected a number') from None
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config, pairs) -> ml_collections.ConfigDict:
  """A copy of config with [(dotted field, text value)] set, each value parsed as its field's
  type; ConfigError naming the flag for an unknown field or an unparsable value."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for field, text in pairs:
      flag = f'--config.{field}={text}'
      node, *_ = (config,)
      parts = field.split('.')
      for j, p in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
          raise ConfigError(f'{flag}: no config field {".".join(parts[:j + 1])!r}')
        node = node[p]
      leaf = parts[-1]
      if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f'{flag}: no config field {field!r}')
      node[leaf] = _parse_value(text, node[leaf], flag)
  return config


HELP_FLAGS = ('--help', '-h', '--helpfull', '--helpshort', '-help', '-?')


def help_requested(argv: Sequence[str]) -> bool:
  args = list(argv[1:])
  if '--' in args:
    args = args[:args.index('--')]
  return any(a in HELP_FLAGS for a in args)


def print_help(doc: str, flag_values, names: Sequence[str]) -> None:
  """The script's docstring (usage examples), then its own flags (`names`) with their
  defaults."""
  print((doc or '').strip() + '\n')
  print('Flags:')
  own = [flag_values[n] for n in names if n in flag_values]
  for f in sorted(own, key=lambda f: f.name):
    default = '' if f.default is None else f' (default: {f.default_as_str})'
    help_text = ' '.join(str(f.help).split())
    print(f'  --{f.name}: {help_text}{default}')
  print('  --config.FIELD=VALUE: override any field of the config (e.g. '
        '--config.quant.n_bits=4); fields: configs/base.py')


def _config_path(argv, name: str) -> str:
  for flag, val in _flag_values(argv, name):
    if flag == name:
      return val
  return ''
