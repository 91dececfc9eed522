"""From `config.data` to data: its checks (one-line ConfigErrors naming the field),
`get_tokenizer` and `build_dataset`."""
from __future__ import annotations

import numbers

from oqt_jax.data import glue, lm, sources, synthetic
from oqt_jax.data import tokenizer as tokenizer_lib
from oqt_jax.errors import ConfigError, DataError

MIN_TRAINED_VOCAB = 512  # byte-level BPE needs 256 bytes + specials; BERT's BPE an alphabet


def _int(d, name: str, low: int, default) -> int:
  v = d.get(name, default)
  if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
    raise ConfigError(f'data.{name}={v!r}: must be an integer >= {low}')
  return int(v)


def lm_kind(config) -> str:
  """'mlm' or 'clm': model.head when it names one, else by model.model_type."""
  head = config.model.get('head', 'auto')
  if head in ('mlm', 'clm'):
    return head
  model_type = config.model.get('model_type', 'bert')
  if model_type not in ('bert', 'opt'):
    raise ConfigError(f"model.model_type={model_type!r}: expected 'bert' or 'opt'")
  return 'mlm' if model_type == 'bert' else 'clm'


def seq_len_field(config) -> str:
  """The config.data field that sets the sequence length of this pipeline."""
  if config.data.get('source', 'embedded') == 'glue' or lm_kind(config) == 'mlm':
    return 'max_seq_length'
  return 'block_size'


def validate_data_config(config) -> None:
  """Raise ConfigError('data.<field>=...: why') for an invalid config.data (no I/O)."""
  d = config.data
  source = d.get('source', 'embedded')
  if source not in sources.SOURCES:
    raise ConfigError(f'data.source={source!r}: unknown; expected one of '
                      f'{", ".join(sources.SOURCES)}')
  if source == 'hub':
    if not d.get('hub_name', ''):
      raise ConfigError("data.hub_name='': required when data.source='hub'")
    if not d.get('text_column', 'text'):
      raise ConfigError("data.text_column='': required when data.source='hub'")
  if source == 'files' and not str(d.get('files', '')).strip():
    raise ConfigError("data.files='': required when data.source='files' (comma-separated "
                      '.txt files or folders)')
  if source == 'glue':
    glue.glue_task_info(d.get('glue_task', ''))
    glue.check_local_files(d)   # the dev split(s) exist before any work
  kind = lm_kind(config)
  model = config.model

  _int(d, 'max_seq_length', 3, 128)
  _int(d, 'block_size', 2, 512)
  _int(d, 'num_workers', 1, 1)
  field = seq_len_field(config)
  max_pos = model.get('max_position_embeddings', None)
  if source == 'synthetic':
    if kind != 'clm':
      raise ConfigError("data.source='synthetic': a causal-LM task; needs model.model_type="
                        "'opt' (or model.head='clm')")
    n = synthetic.task_params(d)['seq_length']
    if max_pos is not None and n > max_pos:
      raise ConfigError(f'data.synthetic.seq_length={n}: longer than '
                        f'model.max_position_embeddings={max_pos}')
  elif max_pos is not None and d.get(field) > max_pos:
    raise ConfigError(f'data.{field}={d.get(field)}: longer than '
                      f'model.max_position_embeddings={max_pos}')
  p = d.get('mlm_probability', 0.15)
  if kind == 'mlm' and not (isinstance(p, numbers.Real) and 0.0 < p < 1.0):
    raise ConfigError(f'data.mlm_probability={p!r}: must be in (0, 1)')
  pct = d.get('validation_split_percentage', 5)
  if isinstance(pct, bool) or not isinstance(pct, numbers.Real) or not 0 <= pct < 100:
    raise ConfigError(f'data.validation_split_percentage={pct!r}: must be in [0, 100)')
  if not d.get('tokenizer', ''):
    v = d.get('tokenizer_vocab_size', 2048)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < MIN_TRAINED_VOCAB:
      raise ConfigError(f'data.tokenizer_vocab_size={v!r}: must be an integer >= '
                        f'{MIN_TRAINED_VOCAB} to train a tokenizer')
  for name in ('line_by_line', 'embedded_docstrings'):
    if not isinstance(d.get(name, False), bool):
      raise ConfigError(f'data.{name}={d.get(name)!r}: must be a bool')


def get_tokenizer(config, workdir: str | None = None):
  """The tokenizer of `config` (see oqt_jax/data/tokenizer.py); a PreTrainedTokenizerFast."""
  validate_data_config(config)
  d = config.data
  if not d.get('tokenizer', '') and d.get('source', 'embedded') == 'synthetic':
    return synthetic.build_tokenizer(d)
  return tokenizer_lib.load_tokenizer(
      config, workdir, lambda: sources.iter_lines(sources.load_texts(d, 'train')))


def check_tokenizer(config, tok) -> None:
  """The model config must agree with the tokenizer: vocab fits, same pad id."""
  n = len(tok)
  vocab = config.model.get('vocab_size', n)
  if n > vocab:
    raise ConfigError(f"model.vocab_size={vocab}: smaller than the tokenizer's vocabulary "
                      f'({n} tokens)')
  pad = config.model.get('pad_token_id', None)
  if pad is not None and tok.pad_token_id is not None and pad != tok.pad_token_id:
    raise ConfigError(f"model.pad_token_id={pad}: the tokenizer's pad token "
                      f'{tok.pad_token!r} has id {tok.pad_token_id}')


def build_dataset(config, tok, split: str, workdir: str | None = None):
  """The dataset of `split` ('train' | 'validation'): an lm.LMDataset or glue.GlueDataset.

  Tokenized arrays are cached under `workdir/data_cache/` (not cached without a workdir).
  """
  validate_data_config(config)
  check_tokenizer(config, tok)
  d = config.data
  if d.get('source', 'embedded') == 'glue':
    ds = glue.build_glue_dataset(config, tok, split, workdir)
  elif d.get('source', 'embedded') == 'synthetic':
    if split not in sources.SPLITS:
      raise ValueError(f"split={split!r}: expected 'train' or 'validation'")
    ds = synthetic.SyntheticDataset(d, seed=config.get('seed', 0), tokenizer=tok)
  else:
    if split not in sources.SPLITS:
      raise ValueError(f"split={split!r}: expected 'train' or 'validation'")
    kind = lm_kind(config)
    if kind == 'mlm' and None in (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id):
      raise DataError(f"data.tokenizer={d.get('tokenizer', '')!r}: MLM needs [CLS], [SEP] "
                      'and [MASK] tokens; the tokenizer lacks one')
    arrays = lm.token_stream(config, tok, split, workdir, kind)
    field = seq_len_field(config)
    ds = lm.LMDataset(arrays['tokens'], arrays['offsets'], kind=kind,
                      seq_len=d.get(field), tokenizer=tok, seed=config.get('seed', 0),
                      mlm_probability=d.get('mlm_probability', 0.15),
                      line_by_line=d.get('line_by_line', False))
    if ds.num_examples == 0:
      raise DataError(f'data.{field}={d.get(field)}: the {split} split has only '
                      f'{ds.num_tokens} tokens, less than one sequence')
  return ds
