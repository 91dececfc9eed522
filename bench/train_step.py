"""Train-step throughput of oqt_jax vs PyTorch + HF transformers, measured in one run.

  python bench/train_step.py                       # BERT-MLM and OPT-CLM x 3 attention variants
  python bench/train_step.py --ref-python /tmp/ref/bin/python   # + transformers 4.31 column
  python bench/train_step.py --memory              # peak host memory of a train step
  python bench/train_step.py --scaling             # 1/2/4/8 simulated CPU devices, data / fsdp
  python bench/train_step.py --device gpu          # BERT-base / OPT-125m bf16 tokens/s and MFU
  python bench/train_step.py --ablate              # oqt_jax only: fast loss path / dropout off

Every framework runs in its own worker process (bench/jax_worker.py, bench/torch_worker.py);
the workers take turns, one timed step at a time (order rotated each repetition), so the
figures of one row are measured under the same machine load. Shape (the issue's CPU shape):
4 layers, hidden 256, 4 heads, FFN 1024, seq 128, batch 16, fp32; AdamW + clipping at 1.0 on
both sides; dropout 0.1 (OPT attention 0.0). tokens/s = batch x seq / median step time.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import shapes  # noqa: E402

GPU_PEAK_TFLOPS = {   # dense bf16 peak per chip (vendor figures)
    'H200': 989.0, 'H100': 989.0, 'A100': 312.0, 'L40S': 362.0, 'L4': 121.0, 'A10': 125.0,
    'V100': 125.0, 'B200': 2250.0, 'GH200': 989.0,
}
GPU_SHAPES = {   # the GPU runs
    'bert': dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072,
                 seq_len=128, batch=128),
    'opt': dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072,
                seq_len=512, batch=32),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='bert,opt')
  p.add_argument('--variants', default=','.join(shapes.VARIANTS))
  p.add_argument('--reps', type=int, default=5, help='timed steps per framework (interleaved)')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--ref-python', default='', help='a Python with torch + transformers 4.31')
  p.add_argument('--no-torch', action='store_true', help='oqt_jax only')
  p.add_argument('--memory', action='store_true')
  p.add_argument('--scaling', action='store_true')
  p.add_argument('--scaling-devices', default='1,2,4,8')
  p.add_argument('--ablate', action='store_true')
  p.add_argument('--device', default='cpu', choices=('cpu', 'gpu'))
  p.add_argument('--peak-tflops', type=float, default=0.0, help='GPU peak (default: by name)')
  p.add_argument('--shape', default='', help='override the shape, e.g. batch=2,seq_len=16')
  p.add_argument('--json', default='', help='write the figures here')
  return p.parse_args(argv)


def cpu_shape(args):
  shape = dict(shapes.CPU_SHAPE)
  for kv in filter(None, args.shape.split(',')):
    k, v = kv.split('=')
    if k not in shape:
      raise SystemExit(f'error: --shape {k}: expected one of {sorted(shape)}')
    shape[k] = int(v)
  return shape


def workers_for(args):
  ws = [common.Worker('oqt_jax', 'jax_worker.py')]
  if not args.no_torch:
    ws.append(common.Worker('torch', 'torch_worker.py'))
    if args.ref_python:
      if not os.path.exists(args.ref_python):
        raise SystemExit(f'error: --ref-python {args.ref_python}: no such file')
      ws.append(common.Worker('torch-ref', 'torch_worker.py', python=args.ref_python))
  return ws


def throughput(args):
  shape = cpu_shape(args)
  tokens = shape['batch'] * shape['seq_len']
  ws = workers_for(args)
  rows, info = [], {}
  try:
    for mt in args.models.split(','):
      for variant in args.variants.split(','):
        for w in ws:
          info[(w.name, mt, variant)] = w.call(cmd='setup', model_type=mt, variant=variant,
                                               shape=shape, warmup=args.warmup)
        times = common.interleaved(ws, args.reps, lambda w: w.call(cmd='time', steps=1)['times'])
        row = {'model': mt, 'variant': variant}
        for w in ws:
          row[w.name] = tokens / common.median(times[w.name])
          row[w.name + '_times'] = times[w.name]
        torch_best = max([row[n] for n in ('torch', 'torch-ref') if n in row], default=None)
        row['ratio'] = row['oqt_jax'] / torch_best if torch_best else None
        rows.append(row)
        print_row(row, ws)
  finally:
    for w in ws:
      w.close()
  versions = {w.name: {k: v for k, v in info[(w.name, mt, variant)].items()
                       if k in ('jax', 'torch', 'transformers', 'threads')} for w in ws}
  print('\nversions:', versions)
  for mt in args.models.split(','):
    van = [r for r in rows if r['model'] == mt and r['variant'] == 'vanilla']
    for r in rows:
      if van and r['model'] == mt and r['variant'] != 'vanilla':
        print(f"{mt} {r['variant']}: oqt_jax cost over vanilla "
              f"{van[0]['oqt_jax'] / r['oqt_jax'] - 1:+.1%}")
  compile_s = {f'{mt}/{v}': round(i['compile_s'], 1) for (n, mt, v), i in info.items()
               if n == 'oqt_jax'}
  print('oqt_jax compile seconds:', compile_s)
  return {'shape': shape, 'rows': rows, 'versions': versions, 'compile_s': compile_s}


def print_row(row, ws):
  if not hasattr(print_row, 'header'):
    print_row.header = True
    names = ' '.join(f'{w.name + " tok/s":>17}' for w in ws)
    print(f"{'model':6} {'variant':8} {names} {'oqt_jax / best torch':>21}")
  vals = ' '.join(f'{row[w.name]:17.0f}' for w in ws)
  ratio = f"{row['ratio']:.2f}x" if row['ratio'] else '-'
  print(f"{row['model']:6} {row['variant']:8} {vals} {ratio:>21}", flush=True)


def memory(args):
  """Peak resident memory (ru_maxrss) of a fresh process per framework that builds the model
  and runs warmup + reps train steps; oqt_jax's compiled step temp buffer beside it."""
  shape = cpu_shape(args)
  names = [('oqt_jax', 'jax_worker.py', sys.executable)]
  if not args.no_torch:
    names.append(('torch', 'torch_worker.py', sys.executable))
    if args.ref_python:
      names.append(('torch-ref', 'torch_worker.py', args.ref_python))
  rows = []
  for mt in args.models.split(','):
    row = {'model': mt}
    for name, script, py in names:
      with common.Worker(name, script, python=py) as w:
        base = w.call(cmd='maxrss')['maxrss_mb']
        setup = w.call(cmd='setup', model_type=mt, variant='vanilla', shape=shape,
                       warmup=args.warmup)
        w.call(cmd='time', steps=2)
        row[name] = w.call(cmd='maxrss')['maxrss_mb']
        row[name + '_imports'] = base
        if name == 'oqt_jax':
          row['oqt_jax_step_temp_mb'] = setup['step_temp_bytes'] / 2 ** 20
          row['oqt_jax_state_mb'] = setup['state_bytes_per_device'] / 2 ** 20
    rows.append(row)
    cols = ', '.join(f"{n} {row[n]:.0f} MB (imports {row[n + '_imports']:.0f})"
                     for n, _, _ in names)
    extra = (f"; oqt_jax step temp {row['oqt_jax_step_temp_mb']:.0f} MB, state "
             f"{row['oqt_jax_state_mb']:.0f} MB")
    ratio = f" -> oqt_jax / torch {row['oqt_jax'] / row['torch']:.2f}x" if 'torch' in row else ''
    print(f'peak RSS {mt}: {cols}{extra}{ratio}', flush=True)
  return {'shape': shape, 'rows': rows}


def scaling(args):
  """Step time and per-device parameter + optimizer bytes on N simulated CPU devices (all
  sharing this machine's cores: the step time shows overheads, not speed-up)."""
  shape = cpu_shape(args)
  mt = args.models.split(',')[0]
  rows = []
  print(f'{mt}: devices  mesh   step s  state MB/device')
  for n in [int(x) for x in args.scaling_devices.split(',')]:
    with common.Worker(f'oqt_jax[{n}]', 'jax_worker.py', env=common.child_env(devices=n)) as w:
      for axis in ('data', 'fsdp'):
        mesh = dict(data=1, fsdp=1, tensor=1)
        mesh[axis] = n
        info = w.call(cmd='setup', model_type=mt, variant='vanilla', shape=shape,
                      warmup=args.warmup, mesh=mesh)
        times = w.call(cmd='time', steps=args.reps)['times']
        row = {'devices': n, 'mesh': axis, 'step_s': common.median(times),
               'state_mb_per_device': info['state_bytes_per_device'] / 2 ** 20,
               'compile_s': info['compile_s']}
        rows.append(row)
        print(f"{n:>13}  {axis:5} {row['step_s']:8.2f} {row['state_mb_per_device']:16.1f}",
              flush=True)
  return {'shape': shape, 'model': mt, 'rows': rows}


def ablate(args):
  """oqt_jax alone: the training fast path vs the full-logit loss, and dropout on / off."""
  shape = cpu_shape(args)
  tokens = shape['batch'] * shape['seq_len']
  rows = []
  for mt in args.models.split(','):
    cases = {'fast loss': {}, 'full-logit loss': {'plain_loss': True},
             'fast loss, no dropout': {'dropout': False}}
    ws = [common.Worker(name, 'jax_worker.py') for name in cases]
    try:
      for w in ws:
        w.call(cmd='setup', model_type=mt, variant='vanilla', shape=shape, warmup=args.warmup,
               **cases[w.name])
      times = common.interleaved(ws, args.reps, lambda w: w.call(cmd='time', steps=1)['times'])
    finally:
      for w in ws:
        w.close()
    base = tokens / common.median(times['fast loss'])
    for name in cases:
      tps = tokens / common.median(times[name])
      rows.append({'model': mt, 'case': name, 'tokens_s': tps})
      print(f'{mt} {name:24} {tps:8.0f} tok/s  ({tps / base:.2f}x the fast loss)', flush=True)
  return {'shape': shape, 'rows': rows}


def gpu(args):
  import jax
  try:
    gpus = jax.devices('gpu')
  except RuntimeError:
    gpus = []
  if not gpus:
    print('error: --device gpu: no GPU visible to JAX (jax.devices("gpu") is empty); '
          'run this on a machine with a GPU and jax[cuda]')
    return None
  kind = gpus[0].device_kind
  peak = args.peak_tflops or next((v for k, v in GPU_PEAK_TFLOPS.items() if k in kind), 0.0)
  rows = []
  with common.Worker('oqt_jax', 'jax_worker.py', env=common.child_env(cpu=False)) as w:
    for mt in args.models.split(','):
      shape = GPU_SHAPES[mt]
      info = w.call(cmd='setup', model_type=mt, variant='vanilla', shape=shape,
                    warmup=args.warmup, dtype='bfloat16', mesh=dict(data=1, fsdp=1, tensor=1))
      times = w.call(cmd='time', steps=max(args.reps, 10))['times']
      step = common.median(times)
      tokens = shape['batch'] * shape['seq_len']
      fpt = shapes.flops_per_token(mt, shape['num_layers'], shape['hidden_size'],
                                   shape['intermediate_size'], shape['seq_len'],
                                   shapes.VOCAB[mt])
      tps = tokens / step
      mfu = fpt * tps / (peak * 1e12) if peak else float('nan')
      rows.append({'model': mt, 'shape': shape, 'tokens_s': tps, 'mfu': mfu, 'gpu': kind,
                   'peak_tflops': peak, 'compile_s': info['compile_s'], 'step_s': step})
      print(f"{mt} bf16 on {kind}: {tps:,.0f} tok/s, step {step * 1e3:.1f} ms, "
            f"MFU {mfu:.1%} (peak {peak} TFLOP/s, {fpt / 1e9:.2f} GFLOP/token)", flush=True)
  return {'rows': rows}


def main(argv=None):
  args = parse_args(argv)
  print('machine:', common.machine(), flush=True)
  out = {'machine': common.machine(), 'args': vars(args)}
  if args.device == 'gpu':
    out['gpu'] = gpu(args)
    common.write_json(args.json, out)
    return 0 if out['gpu'] else 1
  if args.memory:
    out['memory'] = memory(args)
  if args.scaling:
    out['scaling'] = scaling(args)
  if args.ablate:
    out['ablate'] = ablate(args)
  if not (args.memory or args.scaling or args.ablate):
    out['throughput'] = throughput(args)
  common.write_json(args.json, out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
