"""README and docs/: the result tables are the files the scripts wrote, and every config path,
command-line flag, config field and relative link they name exists."""
import glob
import importlib.util
import itertools
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))

# Flags of other programs the docs show (pip, pytest, sbatch, tensorboard, XLA), absl's negated
# booleans, and the original transformer-quantization CLI's flags named in a mapping table.
FOREIGN_FLAGS = {'--no-deps', '--dist', '--durations', '--nodes', '--logdir', '--help',
                 '--xla_force_host_platform_device_count', '--noprogress', '--noplots',
                 '--fix-act-ranges', '--fix-weight-ranges', '--learn-ranges', '--adaround', '--config'}


def _text(path):
  with open(path) as f:
    return f.read()


def _rel(path):
  return os.path.relpath(path, ROOT)


@pytest.fixture(scope='module')
def base_config():
  spec = importlib.util.spec_from_file_location('docs_base_config',
                                                os.path.join(ROOT, 'configs', 'base.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _defined_flags():
  """Every flag train.py, eval.py, experiments/, bench/ and scripts/ define."""
  names = set()
  files = ['train.py', 'eval.py'] + glob.glob(os.path.join(ROOT, 'experiments', '*.py')) + \
      glob.glob(os.path.join(ROOT, 'bench', '*.py')) + glob.glob(os.path.join(ROOT, 'scripts', '*'))
  for f in files:
    text = _text(os.path.join(ROOT, f))
    names |= {'--' + n for n in re.findall(r"DEFINE_\w+\(\s*'([\w-]+)'", text)}
    names |= set(re.findall(r"add_argument\(\s*'(--[\w-]+)'", text))
    names |= set(re.findall(r'(?<![\w-])(--[a-z][\w-]*)=', text)) if f.startswith(
        os.path.join(ROOT, 'scripts')) else set()
  return names


def _braces(name):
  """configs/tiny_{a,b}.py -> configs/tiny_a.py, configs/tiny_b.py."""
  parts = re.split(r'\{([^}]*)\}', name)
  fixed, options = parts[0::2], [p.split(',') for p in parts[1::2]]
  for combo in itertools.product(*options):
    yield ''.join(f + c for f, c in itertools.zip_longest(fixed, combo, fillvalue=''))


def test_result_tables_are_the_results_files():
  """Every `<!-- results/X.md -->` block is the file X.md as the script wrote it."""
  blocks = 0
  for page in PAGES:
    for name, body in re.findall(r'<!-- (results/\S+\.md) -->\n(.*?)\n<!-- end -->',
                                 _text(page), re.S):
      path = os.path.join(ROOT, name)
      assert os.path.exists(path), f'{_rel(page)}: {name} does not exist'
      assert body.strip() == _text(path).strip(), f'{_rel(page)}: {name} differs from the file'
      blocks += 1
  assert blocks >= 6


def test_config_paths_exist():
  named = 0
  for page in PAGES:
    for name in set(re.findall(r'configs/[\w./{},-]*[\w}/]', _text(page))):
      if 'tiny_X' in name:          # a placeholder
        continue
      for path in _braces(name):
        assert os.path.exists(os.path.join(ROOT, path)), f'{_rel(page)}: no {path}'
        named += 1
  assert named > 20


def test_flags_exist():
  defined = _defined_flags() | FOREIGN_FLAGS
  for page in PAGES:
    text = _text(page)
    used = set(re.findall(r'(?<![\w.-])(--[a-zA-Z][\w-]*)(?![\w.])', text))
    unknown = sorted(used - defined)
    assert not unknown, f'{_rel(page)} names flags nothing defines: {unknown}'


def test_config_fields_exist(base_config):
  """--config.a.b=... and experiments' --set a.b=... name fields of configs/base.py."""
  checked = 0
  for page in PAGES:
    text = _text(page)
    fields = [m.group(1) for m in re.finditer(r'--config\.([\w.]+)', text)
              if 'no config field' not in text[m.end():m.end() + 40]   # a misspelling shown
              and not re.search(r'(^|\.)(X|FIELD)$', m.group(1))]          # a placeholder
    fields += [f for f in re.findall(r'--set ([\w.]+)=', text) if f != 'KEY']
    for field in fields:
      node = base_config
      for part in field.rstrip('.').split('.'):
        assert part in node, f'{_rel(page)}: no config field {field!r} (at {part!r})'
        node = node[part]
      checked += 1
  assert checked > 30


def test_relative_links_exist():
  for page in PAGES:
    for target in re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', _text(page)):
      if re.match(r'[a-z]+://', target):
        continue
      path = os.path.normpath(os.path.join(os.path.dirname(page), target))
      assert os.path.exists(path), f'{_rel(page)}: link to {target} goes nowhere'


def test_readme_is_a_front_door():
  readme = _text(os.path.join(ROOT, 'README.md'))
  assert len(readme.splitlines()) <= 350
  for page in glob.glob(os.path.join(ROOT, 'docs', '*.md')):
    assert f'docs/{os.path.basename(page)}' in readme, f'README does not link {_rel(page)}'
