"""Helpers for the training tests: a CPU-sized config and running train.py in a subprocess.

Test-only conveniences (not used by the training code itself):
  TINY_OVERRIDES        command-line overrides shrinking a tiny_* config further
  run_train(...)        python train.py ... in a subprocess (own env, optional compile cache)
  signal_train_when(...) start train.py, send a signal (kill -9) once a condition holds
  committed_steps(dir)  the step numbers of a workdir's committed checkpoints
  seed_workdir(src, dst) copy a trained tokenizer + tokenized-data cache into a new workdir
  tiny_opt(vocab, positions) a 1-layer, 16-wide OPT with random weights (model, variables)
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Mapping, Optional, Sequence

import jax

from oqt_jax import models

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_PY = os.path.join(REPO_ROOT, 'train.py')

# 2 layers, hidden 32, seq 32, batch 8, 512-token tokenizer: seconds per run on a CPU.
TINY_OVERRIDES: dict[str, object] = {
    'model.hidden_size': 32,
    'model.num_heads': 2,
    'model.intermediate_size': 64,
    'model.num_layers': 2,
    'model.max_position_embeddings': 64,
    'model.vocab_size': 512,
    'data.tokenizer_vocab_size': 512,
    'data.block_size': 32,
    'data.max_seq_length': 32,
    'per_device_batch_size': 8,
    'eval_batch_size': 8,
    'num_eval_batches': 2,
    'warmup_steps': 5,
    'learning_rate': 3e-3,
}

# Directories a workdir can share with another run of the same data config.
SHAREABLE = ('tokenizer', 'data_cache')


def flags_for(overrides: Mapping[str, object]) -> list[str]:
  return [f'--config.{k}={v}' for k, v in overrides.items()]


# XLA:CPU spends most of a tiny model's test time compiling; these make it ~2x faster
# (every run being compared is compiled with the same flags).
FAST_COMPILE_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def subprocess_env(compile_cache: Optional[str] = None, devices: Optional[int] = None,
                   fast_compile: bool = False,
                   extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
  """Environment for a child JAX process: CPU, no network, optional persistent compile cache
  (identical executables, so results do not change), simulated device count and cheaper
  XLA compilation."""
  env = dict(os.environ)
  env.update({'JAX_PLATFORMS': 'cpu', 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1',
              'TRANSFORMERS_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false',
              'PYTHONPATH': REPO_ROOT + os.pathsep + env.get('PYTHONPATH', '')})
  if compile_cache:
    env['JAX_COMPILATION_CACHE_DIR'] = compile_cache
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  xla = env.get('XLA_FLAGS', '')
  if devices:
    xla += f' --xla_force_host_platform_device_count={devices}'
  if fast_compile:
    xla += ' ' + FAST_COMPILE_XLA_FLAGS
  if xla.strip():
    env['XLA_FLAGS'] = xla.strip()
  if extra:
    env.update(extra)
  return env


def train_command(config_file: str, workdir: str, overrides: Mapping[str, object] = (),
                  extra_args: Sequence[str] = ()) -> list[str]:
  cfg = config_file if os.path.isabs(config_file) else os.path.join(REPO_ROOT, config_file)
  return [sys.executable, TRAIN_PY, f'--config={cfg}', f'--workdir={workdir}',
          '--progress=false', *flags_for(dict(overrides)), *extra_args]


def run_train(config_file: str, workdir: str, overrides: Mapping[str, object] = (),
              *, env: Optional[Mapping[str, str]] = None, timeout: float = 600,
              extra_args: Sequence[str] = ()) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(config_file, workdir, overrides, extra_args),
                        cwd=REPO_ROOT, env=dict(env or subprocess_env()), capture_output=True,
                        text=True, timeout=timeout)


def committed_steps(workdir: str) -> list[int]:
  """Step numbers of the committed checkpoints in WORKDIR/checkpoints, ascending."""
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def signal_train_when(config_file: str, workdir: str, overrides: Mapping[str, object],
                      when: Callable[[], bool], *, env: Optional[Mapping[str, str]] = None,
                      sig: int = signal.SIGKILL, timeout: float = 300) -> tuple[int, str]:
  """Start train.py, poll `when()` every 10 ms and send `sig` as soon as it is true (or let
  the run end); returns (returncode, stderr)."""
  proc = subprocess.Popen(train_command(config_file, workdir, overrides), cwd=REPO_ROOT,
                          env=dict(env or subprocess_env()), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  try:
    while time.time() < deadline and proc.poll() is None:
      if when():
        os.kill(proc.pid, sig)
        break
      time.sleep(0.01)
    _, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, err


def seed_workdir(src: str, dst: str) -> None:
  """Copy the tokenizer and tokenized data cache of `src` into workdir `dst` (a cache hit
  for the same data config: skips training the tokenizer again)."""
  os.makedirs(dst, exist_ok=True)
  for name in SHAREABLE:
    s = os.path.join(src, name)
    if os.path.isdir(s) and not os.path.exists(os.path.join(dst, name)):
      shutil.copytree(s, os.path.join(dst, name))


def tiny_opt(vocab_size: int, max_position_embeddings: int, seed: int = 0):
  """(model, variables): a 1-layer, 16-wide OPT with random weights, for unit tests."""
  cfg = models.ModelConfig(model_type='opt', vocab_size=vocab_size, hidden_size=16,
                           num_layers=1, num_heads=2, intermediate_size=32,
                           max_position_embeddings=max_position_embeddings, activation='relu',
                           pad_token_id=1)
  model = models.build(cfg)
  return model, models.init_variables(model, jax.random.PRNGKey(seed))
