"""Device mesh (data, fsdp, tensor), logical-axis rules, and multi-process start-up.

Parameters carry logical axis names (see oqt_jax/models/layers.py). `LOGICAL_AXIS_RULES`
maps each name to a mesh axis:

  vocab -> tensor     embedding rows / LM-head columns split over tensor-parallel devices
  embed -> fsdp       the model dimension of every kernel split over FSDP devices
  mlp   -> tensor     FFN hidden units (Megatron-style column/row split)
  heads -> tensor     attention heads (Q/K/V columns, output-projection rows)
  batch -> (data, fsdp)   activations / data batches
  kv, norm, classes, gate, None -> replicated
  length, length_kv -> replicated (activations only: sequence positions, attended keys)

Activations are constrained with the same names (oqt_jax.models.layers.constrain) inside
the jitted steps, under `activation_context(mesh)`: (batch, length, embed) for the residual
stream, (batch, length, mlp) for the FFN hidden units, (batch, heads, length, kv) for
per-head q/k/v/context, (batch, heads, length, length_kv) for scores / probabilities. For
activations `embed` ends up replicated because `batch` already claims fsdp.

A dimension whose size the mesh axis does not divide is left replicated (so a tiny model
or an odd vocabulary still runs on any mesh). The same tables serve one CPU, simulated CPU
devices, one GPU and multi-host TPU/GPU slices.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from oqt_jax.models.layers import logical_spec
from oqt_jax.train.config import MESH_AXES, mesh_shape

log = logging.getLogger(__name__)

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('length', None),
    ('length_kv', None),
    ('norm', None),
    ('classes', None),
    ('gate', None),
)


# ---------------------------------------------------------------------------- processes
def _env_int(env, name, default=1):
  try:
    return int(env.get(name, default))
  except (TypeError, ValueError):
    return default


def multiprocess_launch(env: Mapping[str, str] | None = None) -> bool:
  """True when the environment says this is one of several processes of a cluster job.

  Recognised: JAX_COORDINATOR_ADDRESS (explicit), SLURM with more than one task, Open MPI
  with more than one rank, a multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES lists several
  hosts). A plain single-process run (laptop, one GPU box, one TPU VM host) returns False.
  """
  env = os.environ if env is None else env
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if 'SLURM_JOB_ID' in env and _env_int(env, 'SLURM_NTASKS', _env_int(env, 'SLURM_NPROCS')) > 1:
    return True
  if _env_int(env, 'OMPI_COMM_WORLD_SIZE') > 1:
    return True
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h.strip()]
  return len(hosts) > 1


def maybe_initialize_distributed(mode: str = 'auto', env: Mapping[str, str] | None = None) -> bool:
  """Call jax.distributed.initialize() for multi-process launches; must run before any JAX op.

  mode: 'auto' (detect from the environment), 'yes' (always), 'no' (never).
  Returns True when it initialised. Explicit settings come from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID; otherwise JAX detects SLURM / Open MPI / Cloud TPU.
  """
  env = os.environ if env is None else env
  if mode == 'no' or (mode == 'auto' and not multiprocess_launch(env)):
    return False
  kwargs = {}
  if env.get('JAX_COORDINATOR_ADDRESS'):
    kwargs['coordinator_address'] = env['JAX_COORDINATOR_ADDRESS']
    if env.get('JAX_NUM_PROCESSES'):
      kwargs['num_processes'] = int(env['JAX_NUM_PROCESSES'])
    if env.get('JAX_PROCESS_ID'):
      kwargs['process_id'] = int(env['JAX_PROCESS_ID'])
  jax.distributed.initialize(**kwargs)
  log.info('jax.distributed initialised: process %d of %d, %d local / %d global devices',
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


# ---------------------------------------------------------------------------- mesh
def create_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh with axes (data, fsdp, tensor) sized from `config.mesh` (-1 = remaining devices).

  Axis types are Auto (GSPMD propagation); `devices` defaults to all devices.
  """
  n = len(devices) if devices is not None else jax.device_count()
  shape = mesh_shape(mesh_cfg, n)
  kw = {} if devices is None else {'devices': list(devices)}
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), **kw)


def activation_context(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Context in which the models' activation constraints take effect (enter it inside the
  traced function: it sets the abstract mesh and the Flax logical-axis rules)."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
  stack.enter_context(nn.logical_axis_rules(rules))
  return stack


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch is split: data * fsdp."""
  return mesh.shape['data'] * mesh.shape['fsdp']


def logical_to_mesh_spec(logical: Sequence[Any] | None, shape: Sequence[int], mesh: Mesh,
                         rules=LOGICAL_AXIS_RULES) -> P:
  """PartitionSpec for one array: map logical names through `rules`, dropping mesh axes that
  are already used by an earlier dimension, have size 1, or do not divide the dimension."""
  return logical_spec(logical, shape, dict(mesh.shape), rules)


def logical_partition_specs(boxed_tree) -> Any:
  """Tree of logical PartitionSpecs (names) for a tree with nn.LogicallyPartitioned leaves."""
  return nn.get_partition_spec(boxed_tree)


def tree_shardings(boxed_abstract, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for an abstract (eval_shape) tree whose leaves may be boxed with logical
  names; unboxed leaves are replicated. Returned tree matches the *unboxed* structure."""
  specs = logical_partition_specs(boxed_abstract)
  shapes = nn.meta.unbox(boxed_abstract)

  def one(spec, leaf):
    return NamedSharding(mesh, logical_to_mesh_spec(tuple(spec), leaf.shape, mesh, rules))
  return jax.tree.map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
  """Shard dimension `batch_dim` over (data, fsdp), the rest replicated."""
  axes = tuple(a for a in ('data', 'fsdp') if mesh.shape[a] > 1)
  spec = [None] * ndim
  if axes:
    spec[batch_dim] = axes if len(axes) > 1 else axes[0]
  return NamedSharding(mesh, P(*spec))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, global_shape_dim0: int | None = None,
                 batch_dim: int = 0) -> dict[str, jax.Array]:
  """Host batch (this process's rows) -> global jax.Arrays sharded over (data, fsdp).

  In a single process `local` is the whole batch. In a multi-process job each process passes
  its own rows (`global_shape_dim0` = rows of the whole batch along `batch_dim`).
  """
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    shape = list(v.shape)
    if global_shape_dim0 is not None:
      shape[batch_dim] = global_shape_dim0
    s = batch_sharding(mesh, v.ndim, batch_dim)
    out[k] = jax.make_array_from_process_local_data(s, v, tuple(shape))
  return out


def replicated_batch(full: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """A batch every process holds in full (eval) -> global arrays sharded over (data, fsdp)
  where the batch divides evenly, replicated otherwise."""
  out = {}
  for k, v in full.items():
    v = np.asarray(v)
    s = batch_sharding(mesh, v.ndim)
    if v.shape[0] % batch_shards(mesh):
      s = replicated(mesh)
    out[k] = jax.make_array_from_callback(v.shape, s, lambda idx, v=v: v[idx])
  return out


def to_host(tree):
  """Fetch a (possibly multi-host sharded) tree to numpy on every process."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)
