"""The jitted train step: gradient accumulation, clipping, AdamW, dropout RNG, metrics.

A batch has a leading micro-batch axis: every leaf is (A, B, ...) with A =
gradient_accumulation_steps and B the global micro-batch (sharded over data x fsdp).
Losses are (sum, count) pairs, so the accumulated gradient is exactly the gradient of the
mean loss over all A*B examples' valid tokens, whatever A and the mesh are.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from oqt_jax.train import losses
from oqt_jax.train import sharding as shd
from oqt_jax.train.state import TrainState

MODEL_INPUTS = ('input_ids', 'attention_mask', 'token_type_ids')


def model_inputs(batch: Mapping[str, Any], model_type: str) -> dict:
  keys = MODEL_INPUTS if model_type == 'bert' else MODEL_INPUTS[:2]
  return {k: batch[k] for k in keys if k in batch}


def loss_sum_fn(apply_fn: Callable, head: str, model_type: str, params, batch, *,
                deterministic: bool, dropout_rng=None, model: nn.Module | None = None):
  """(sum, count) of the head's loss on one (micro-)batch (given `model`, the training fast
  path of losses.train_loss: same value and gradient, less work)."""
  rngs = None if deterministic else {'dropout': dropout_rng}
  out = apply_fn({'params': params}, **model_inputs(batch, model_type),
                 deterministic=deterministic, rngs=rngs)
  if model is not None:
    return losses.train_loss(model, head, out, params, batch)
  return losses.loss_for_head(head, out.logits, batch)


def make_train_step(model: nn.Module, head: str, schedule: optax.Schedule,
                    shardings: TrainState, mesh: Mesh, batch_keys, donate: bool = True):
  """jit(train_step)(state, batch) -> (state, metrics) with in/out shardings, state donated.
  The model's activation constraints are traced under `mesh` and the logical-axis rules.

  metrics (replicated scalars): loss (mean CE of this step's batch), grad_norm (before
  clipping), lr (used for this update), tokens (loss targets counted).
  """
  model_type = model.cfg.model_type
  apply_fn = model.apply

  def micro_grads(params, mb, rng):
    def f(p):
      s, c = loss_sum_fn(apply_fn, head, model_type, p, mb, deterministic=False,
                         dropout_rng=rng, model=model)
      return s, c
    (s, c), g = jax.value_and_grad(f, has_aux=True)(params)
    return s, c, g

  def train_step(state: TrainState, batch):
    with shd.activation_context(mesh):
      return _train_step(state, batch)

  def _train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    n_micro = jax.tree.leaves(batch)[0].shape[0]
    if n_micro == 1:
      s, c, g = micro_grads(state.params, jax.tree.map(lambda x: x[0], batch),
                            jax.random.fold_in(step_rng, 0))
    else:
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      zeros = jax.lax.with_sharding_constraint(zeros, shardings.params)

      def body(carry, xs):
        i, mb = xs
        s, c, g = micro_grads(state.params, mb, jax.random.fold_in(step_rng, i))
        acc_s, acc_c, acc_g = carry
        acc_g = jax.tree.map(jnp.add, acc_g, g)
        acc_g = jax.lax.with_sharding_constraint(acc_g, shardings.params)
        return (acc_s + s, acc_c + c, acc_g), None
      init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
      (s, c, g), _ = jax.lax.scan(body, init, (jnp.arange(n_micro), batch))
    denom = jnp.maximum(c, 1.0)
    grads = jax.tree.map(lambda x: x / denom, g)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': s / denom, 'grad_norm': grad_norm,
               'lr': jnp.asarray(schedule(state.step), jnp.float32), 'tokens': c}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  bshard = {k: shd.batch_sharding(mesh, 3, batch_dim=1) for k in batch_keys}
  rep = shd.replicated(mesh)
  return jax.jit(train_step, in_shardings=(shardings, bshard),
                 out_shardings=(shardings, rep), donate_argnums=(0,) if donate else ())
