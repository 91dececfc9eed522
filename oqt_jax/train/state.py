"""Train state (step, params, optimizer state, dropout RNG) created directly in its shardings.

Initialisation is a jitted function whose outputs are placed by `out_shardings`, so no
device ever holds a full unsharded copy of a model that needs FSDP. With JAX's partitionable
threefry RNG the initial values do not depend on the mesh.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from oqt_jax import models
from oqt_jax.train import sharding as shd

INIT_SEQ_LEN = 8


class TrainState(struct.PyTreeNode):
  """step: optimizer steps done (int32); rng: base dropout key (uint32[2]); the key of step s
  is fold_in(rng, s), so the RNG stream is a pure function of (seed, step)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  apply_fn: Callable = struct.field(pytree_node=False, default=None)
  tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)
  # QAT (quant/methods/qat.py): the 'quant' collection and the optimizer state of its
  # learnable leaves; None when the run trains a floating-point model.
  quant: Any = None
  quant_opt_state: Any = None
  range_tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)
  learn_ranges: str = struct.field(pytree_node=False, default='none')

  def checkpoint_items(self) -> dict:
    """The part that is saved: a plain dict of arrays."""
    items = {'step': self.step, 'params': self.params, 'opt_state': self.opt_state,
             'rng': self.rng}
    if self.quant is not None:
      items.update(quant=self.quant, quant_opt_state=self.quant_opt_state)
    return items

  def with_items(self, items: dict) -> 'TrainState':
    return self.replace(step=items['step'], params=items['params'],
                        opt_state=items['opt_state'], rng=items['rng'],
                        quant=items.get('quant', self.quant),
                        quant_opt_state=items.get('quant_opt_state', self.quant_opt_state))


def seed_keys(seed: int):
  """(params init key, dropout base key) from config.seed."""
  root = jax.random.PRNGKey(seed)
  return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def abstract_params(model: nn.Module, seq_len: int = INIT_SEQ_LEN):
  """eval_shape of the boxed params (logical axis metadata kept)."""
  return jax.eval_shape(
      lambda r: models.init_variables(model, r, seq_len=seq_len, boxed=True)['params'],
      jax.random.PRNGKey(0))


def _names(path) -> tuple:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def opt_state_shardings(abstract_opt, params, p_shard, rep):
  """The optimizer state's shardings: a leaf whose key path ends with a parameter's path and
  has its shape (Adam's mu / nu, Muon's momentum, also inside optax.multi_transform's
  partitions) is sharded like that parameter; counts and the rest are replicated."""
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                    jax.tree.leaves(p_shard)):
    by_path[_names(path)] = (tuple(leaf.shape), sharding)

  def one(path, leaf):
    names = _names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and hit[0] == tuple(getattr(leaf, 'shape', ())):
        return hit[1]
    return rep
  return jax.tree_util.tree_map_with_path(one, abstract_opt)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    rules=shd.LOGICAL_AXIS_RULES) -> TrainState:
  """A TrainState whose leaves are the NamedShardings of the real state's leaves."""
  boxed = abstract_params(model)
  p_shard = shd.tree_shardings(boxed, mesh, rules)
  params = nn.meta.unbox(boxed)
  rep = shd.replicated(mesh)
  o_shard = opt_state_shardings(jax.eval_shape(tx.init, params), params, p_shard, rep)
  return TrainState(step=rep, params=p_shard, opt_state=o_shard, rng=rep,
                    apply_fn=model.apply, tx=tx)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                   shardings: TrainState | None = None) -> TrainState:
  """TrainState of jax.ShapeDtypeStruct (with shardings): the restore target."""
  shardings = shardings or state_shardings(model, tx, mesh)
  params = nn.meta.unbox(abstract_params(model))
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=jax.eval_shape(tx.init, params),
                      rng=jax.ShapeDtypeStruct((2,), jnp.uint32), apply_fn=model.apply, tx=tx)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                       seed: int, shardings: TrainState | None = None) -> TrainState:
  """Freshly initialised state, laid out in `shardings` (computed if not given)."""
  shardings = shardings or state_shardings(model, tx, mesh)
  init_key, dropout_key = seed_keys(seed)

  def init():
    params = nn.meta.unbox(models.init_variables(model, init_key, seq_len=INIT_SEQ_LEN,
                                                 boxed=True)['params'])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=dropout_key, apply_fn=model.apply, tx=tx)

  return jax.jit(init, out_shardings=shardings)()
