"""Validation of the flat training fields and `config.mesh` (ConfigError 'field=value: why').

Only what the training loop reads is checked here; model fields are checked by
`oqt_jax.models.config.from_config`, data fields by `oqt_jax.data.validate_data_config`.
Checks that need the device count (mesh sizes, batch divisibility) live in `check_mesh_fit`,
called once the devices are known.
"""
from __future__ import annotations

from typing import Any

from oqt_jax.errors import ConfigError

LR_SCHEDULES = ('linear', 'cosine', 'constant')
OPTIMIZERS = ('adamw', 'muon')
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
NONFINITE_MODES = ('stop', 'skip')
MESH_AXES = ('data', 'fsdp', 'tensor')


def _get(config, name, default=None):
  return config.get(name, default) if hasattr(config, 'get') else getattr(config, name, default)


def _bad(field: str, value: Any, why: str):
  raise ConfigError(f'{field}={value!r}: {why}')


def _int(config, field, minimum, default=None):
  v = _get(config, field, default)
  if isinstance(v, bool) or not isinstance(v, int):
    _bad(field, v, 'must be an integer')
  if v < minimum:
    _bad(field, v, f'must be >= {minimum}')
  return v


def _float(config, field, lo=None, hi=None, lo_open=False, hi_open=False, default=None):
  v = _get(config, field, default)
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    _bad(field, v, 'must be a number')
  v = float(v)
  if v != v:  # NaN
    _bad(field, v, 'must be a number')
  if lo is not None and (v <= lo if lo_open else v < lo):
    _bad(field, v, f'must be {">" if lo_open else ">="} {lo}')
  if hi is not None and (v >= hi if hi_open else v > hi):
    _bad(field, v, f'must be {"<" if hi_open else "<="} {hi}')
  return v


def validate_train_config(config) -> None:
  """Raise ConfigError naming the first invalid training / mesh field of `config`."""
  _int(config, 'seed', 0)
  _int(config, 'num_train_steps', 1)
  _int(config, 'per_device_batch_size', 1)
  gbs = _get(config, 'global_batch_size', -1)
  if isinstance(gbs, bool) or not isinstance(gbs, int) or (gbs < 1 and gbs != -1):
    _bad('global_batch_size', gbs, 'must be a positive integer or -1 (per_device_batch_size x devices)')
  _int(config, 'eval_batch_size', 1)
  _int(config, 'num_eval_batches', 0)
  _int(config, 'gradient_accumulation_steps', 1)
  _float(config, 'learning_rate', lo=0.0)
  _int(config, 'warmup_steps', 0)
  sched = _get(config, 'lr_schedule', 'linear')
  if sched not in LR_SCHEDULES:
    _bad('lr_schedule', sched, f'expected one of {LR_SCHEDULES}')
  opt = _get(config, 'optimizer', 'adamw')
  if opt not in OPTIMIZERS:
    _bad('optimizer', opt, f'expected one of {OPTIMIZERS}')
  _float(config, 'adam_b1', lo=0.0, hi=1.0, hi_open=True)
  _float(config, 'adam_b2', lo=0.0, hi=1.0, hi_open=True)
  _float(config, 'adam_eps', lo=0.0, lo_open=True)
  _float(config, 'weight_decay', lo=0.0)
  if not isinstance(_get(config, 'decay_layer_norm', False), bool):
    _bad('decay_layer_norm', _get(config, 'decay_layer_norm'), 'must be True or False')
  _float(config, 'max_grad_norm', default=1.0)   # <= 0: no clipping
  dt = _get(config, 'compute_dtype', 'float32')
  if dt not in COMPUTE_DTYPES:
    _bad('compute_dtype', dt, f'expected one of {COMPUTE_DTYPES}')
  _int(config, 'checkpoint_every_steps', 1)
  _int(config, 'keep_checkpoints', 1)
  _int(config, 'eval_every_steps', 0)             # 0: evaluate only at the end
  _int(config, 'log_every_steps', 1)
  if not isinstance(_get(config, 'export_hf', True), bool):
    _bad('export_hf', _get(config, 'export_hf'), 'must be True or False')
  nf = _get(config, 'nonfinite', 'stop')
  if nf not in NONFINITE_MODES:
    _bad('nonfinite', nf, f'expected one of {NONFINITE_MODES}')
  _int(config, 'max_skipped_steps', 1, default=10)
  validate_finetune_config(config)
  validate_mesh_config(_get(config, 'mesh'))


LOSSES = ('lm', 'distill')


def validate_finetune_config(config) -> None:
  """init_from (a string), num_train_epochs (> 0 or <= 0 = off), warmup_ratio (< 0 = off, else
  in [0, 1])."""
  init = _get(config, 'init_from', '')
  if not isinstance(init, str):
    _bad('init_from', init, 'must be a path, hub name or empty')
  loss = _get(config, 'loss', 'lm')
  if loss not in LOSSES:
    _bad('loss', loss, f'expected one of {LOSSES}')
  if loss == 'distill' and not init:
    _bad('loss', loss, 'needs init_from (the teacher is the init_from checkpoint)')
  if _float(config, 'distill_mlm_weight', default=0.0) < 0:
    _bad('distill_mlm_weight', _get(config, 'distill_mlm_weight'), 'must be >= 0')
  _float(config, 'num_train_epochs', default=-1.0)
  ratio = _float(config, 'warmup_ratio', default=-1.0)
  if ratio > 1.0:
    _bad('warmup_ratio', ratio, 'must be <= 1 (a fraction of num_train_steps; < 0: use warmup_steps)')


def validate_mesh_config(mesh) -> None:
  """mesh.{data,fsdp,tensor}: positive sizes, at most one -1 (= all remaining devices)."""
  if mesh is None:
    _bad('mesh', mesh, 'missing (expected data, fsdp, tensor sizes)')
  keys = set(mesh.keys()) if hasattr(mesh, 'keys') else set()
  unknown = sorted(keys - set(MESH_AXES))
  if unknown:
    _bad(f'mesh.{unknown[0]}', mesh[unknown[0]], f'unknown mesh axis (known: {", ".join(MESH_AXES)})')
  n_auto = 0
  for ax in MESH_AXES:
    v = _get(mesh, ax, 1)
    if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
      _bad(f'mesh.{ax}', v, 'must be a positive integer or -1 (all remaining devices)')
    n_auto += v == -1
  if n_auto > 1:
    _bad('mesh', dict(mesh), 'at most one axis may be -1')


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolve -1 against the device count; ConfigError if the sizes do not fit."""
  validate_mesh_config(mesh_cfg)
  sizes = [int(_get(mesh_cfg, ax, 1)) for ax in MESH_AXES]
  fixed = 1
  for s in sizes:
    if s != -1:
      fixed *= s
  if -1 in sizes:
    if num_devices % fixed:
      _bad('mesh', dict(mesh_cfg), f'fixed axes (product {fixed}) do not divide the '
           f'{num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    _bad('mesh', dict(mesh_cfg), f'product of axis sizes is {fixed} but there are '
         f'{num_devices} devices (use -1 for one axis to take the rest)')
  return tuple(sizes)


def check_batch_fit(config, num_devices: int, batch_shards: int, process_count: int = 1) -> int:
  """The global batch per micro-step; checks it shards evenly.

  config.global_batch_size > 0 fixes it whatever the device count (the recipes' batch, so a
  run means the same on 1 GPU or 64); otherwise it is per_device_batch_size * devices.
  """
  fixed = _get(config, 'global_batch_size', -1)
  if fixed is not None and fixed > 0:
    field, value, global_batch = 'global_batch_size', fixed, int(fixed)
  else:
    field, value = 'per_device_batch_size', config.per_device_batch_size
    global_batch = int(config.per_device_batch_size) * num_devices
  if global_batch % batch_shards:
    _bad(field, value, f'global batch {global_batch} must be divisible by data*fsdp={batch_shards}')
  if global_batch % process_count:
    _bad(field, value, f'global batch {global_batch} must be divisible by the {process_count} '
         'processes')
  return global_batch
