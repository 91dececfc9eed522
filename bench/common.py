"""Worker processes and small statistics shared by the bench scripts."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)


class BenchError(RuntimeError):
  pass


def child_env(devices: int | None = None, cpu: bool = True, extra=None) -> dict:
  env = dict(os.environ)
  env.update({'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1',
              'TOKENIZERS_PARALLELISM': 'false', 'TF_CPP_MIN_LOG_LEVEL': '3',
              'PYTHONPATH': ROOT + os.pathsep + env.get('PYTHONPATH', '')})
  if cpu:
    env['JAX_PLATFORMS'] = 'cpu'
  if devices:
    flags = [f for f in env.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
  env.update(extra or {})
  return env


class Worker:
  """A persistent worker process (jax_worker.py / torch_worker.py) spoken to in JSON lines;
  only one worker computes at a time, so interleaved timings do not compete for the CPU."""

  def __init__(self, name: str, script: str, python: str = sys.executable, env=None):
    self.name = name
    self.proc = subprocess.Popen([python, os.path.join(BENCH, script)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE
                                 if os.environ.get('BENCH_QUIET_WORKERS') else None,
                                 text=True, env=env or child_env(), cwd=ROOT)

  def call(self, **msg) -> dict:
    self.proc.stdin.write(json.dumps(msg) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise BenchError(f'{self.name}: worker exited (code {self.proc.wait()})')
    reply = json.loads(line)
    if 'error' in reply:
      raise BenchError(f"{self.name}: {reply['error']}\n{reply.get('trace', '')}")
    return reply

  def close(self):
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({'cmd': 'quit'}) + '\n')
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def median(xs):
  return statistics.median(xs) if xs else float('nan')


def interleaved(workers, reps: int, run) -> dict:
  """Run `run(worker)` (a list of times) for every worker, rep by rep, rotating the order
  each rep; returns {worker name: all times}."""
  out = {w.name: [] for w in workers}
  for r in range(reps):
    k = r % len(workers)
    for w in workers[k:] + workers[:k]:
      out[w.name].extend(run(w))
  return out


def machine() -> str:
  import platform
  try:
    load = os.getloadavg()[0]
  except OSError:
    load = float('nan')
  return (f'{platform.machine()} {os.cpu_count()} cores, load average {load:.1f} at start, '
          f'Python {platform.python_version()}')


def write_json(path, obj):
  if path:
    with open(path, 'w') as f:
      json.dump(obj, f, indent=1)
    print(f'wrote {path}')
