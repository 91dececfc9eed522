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

from oqt_jax.quant.methods import qat
from oqt_jax.train import losses
from oqt_jax.train import sharding as shd
from oqt_jax.train.state import TrainState

MODEL_INPUTS = ('input_ids', 'attention_mask', 'token_type_ids')


def model_inputs(batch: Mapping[str, Any], model_type: str) -> dict:
  keys = MODEL_INPUTS if model_type == 'bert' else MODEL_INPUTS[:2]
  return {k: batch[k] for k in keys if k in batch}


def loss_sum_fn(apply_fn: Callable, head: str, model_type: str, params, batch, *,
                deterministic: bool, dropout_rng=None, quant=None,
                model: nn.Module | None = None, update_quant: bool = False,
                distill_mlm_weight: float = 0.0):
  """(sum, count) of the head's loss on one (micro-)batch (`quant`: QAT's 'quant' collection;
  given `model`, the training fast path of losses.train_loss: same value and gradient, less
  work). update_quant: the collection is mutable (QAT re-estimating its ranges) and
  (sum, count, new collection) is returned."""
  rngs = None if deterministic else {'dropout': dropout_rng}
  variables = {'params': params} if quant is None else {'params': params, 'quant': quant}
  kw = {'mutable': ['quant']} if update_quant else {}
  out = apply_fn(variables, **model_inputs(batch, model_type),
                 deterministic=deterministic, rngs=rngs, **kw)
  new_quant = None
  if update_quant:
    out, new_quant = out[0], out[1]['quant']
  if 'teacher_hidden' in batch:   # config.loss='distill': the frozen teacher's final states
    mlm = (out.logits, batch['labels']) if head == 'mlm' and distill_mlm_weight > 0 else None
    res = losses.distill_loss(out.last_hidden_state, batch['teacher_hidden'],
                              batch['attention_mask'], mlm, distill_mlm_weight)
  elif model is not None:
    res = losses.train_loss(model, head, out, params, batch)
  else:
    res = losses.loss_for_head(head, out.logits, batch)
  return (*res, new_quant) if update_quant else res


def tree_all_finite(tree, small: int = 4096) -> jax.Array:
  """Scalar bool: every floating-point leaf of `tree` is free of NaN / Inf.

  Leaves of at most `small` elements are checked in one reduction over their concatenation:
  XLA turns per-leaf checks of scalar leaves (QAT's hundreds of range parameters) into a chain
  of scalar ops that it fuses into every consumer of the result (each leaf's
  keep_if_not_finite select), a program quadratic in the number of leaves that took minutes
  to compile."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  tiny = [jnp.ravel(x).astype(jnp.float32) for x in leaves if x.size <= small]
  flags = [jnp.all(jnp.isfinite(x)) for x in leaves if x.size > small]
  if tiny:
    flags.append(jnp.all(jnp.isfinite(jnp.concatenate(tiny))))
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def keep_if_not_finite(finite, new, old):
  """`new` where `finite` (a scalar bool) else `old`, leaf by leaf (a select, no host sync)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def make_train_step(model: nn.Module, head: str, schedule: optax.Schedule,
                    shardings: TrainState, mesh: Mesh, batch_keys, donate: bool = True,
                    distill_mlm_weight: float = 0.0):
  """jit(train_step)(state, batch) -> (state, metrics) with in/out shardings, state donated.
  The model's activation constraints are traced under `mesh` and the logical-axis rules.

  metrics (replicated scalars): loss (mean CE of this step's batch), grad_norm (before
  clipping), lr (used for this update), tokens (loss targets counted), finite (1.0 when the
  loss, the gradient norm and the updated parameters are finite, else 0.0).

  A non-finite step never changes the parameters or the optimizer state: they are kept as
  they were (the step counter still advances, so the next step reads the next batch); the
  training loop reads `finite` when it syncs anyway and stops or counts the skipped step
  (config.nonfinite).
  """
  model_type = model.cfg.model_type
  apply_fn = model.apply

  def micro_grads(params, mb, rng, quant=None, learn='none'):
    # QAT: the learnable leaves of the 'quant' collection are differentiated with the params.
    ranges = None if quant is None else qat.split(quant, learn)
    # QAT learn_ranges='none': the estimators' new range state comes back (else `quant`).
    estimate = quant is not None and qat.estimates_ranges(learn)

    def f(p, r):
      out = loss_sum_fn(apply_fn, head, model_type, p, mb, deterministic=False,
                        dropout_rng=rng, quant=None if quant is None else qat.merge(quant, r),
                        model=model, update_quant=estimate,
                        distill_mlm_weight=distill_mlm_weight)
      return out[0], (out[1], out[2] if estimate else quant)
    (s, (c, new_q)), (g, gr) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params,
                                                                                  ranges)
    return s, c, (g if quant is None else (g, gr)), new_q

  def train_step(state: TrainState, batch):
    with shd.activation_context(mesh):
      return _train_step(state, batch)

  def _train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    n_micro = jax.tree.leaves(batch)[0].shape[0]
    qat_kw = {} if state.quant is None else dict(quant=state.quant, learn=state.learn_ranges)
    if n_micro == 1:
      s, c, g, new_q = micro_grads(state.params, jax.tree.map(lambda x: x[0], batch),
                                   jax.random.fold_in(step_rng, 0), **qat_kw)
    else:
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      zeros = jax.lax.with_sharding_constraint(zeros, shardings.params)
      if qat_kw:
            zeros = (zeros, jax.tree.map(jnp.zeros_like, qat.split(state.quant, state.learn_ranges)))

      def body(carry, xs):
        i, mb = xs
        acc_s, acc_c, acc_g, q = carry
        kw = dict(qat_kw, quant=q) if qat_kw else {}   # QAT 'none': q moves per micro-batch
        s, c, g, q = micro_grads(state.params, mb, jax.random.fold_in(step_rng, i), **kw)
        acc_g = jax.tree.map(jnp.add, acc_g, g)
        if qat_kw:
          acc_g = (jax.lax.with_sharding_constraint(acc_g[0], shardings.params), acc_g[1])
        else:
          acc_g = jax.lax.with_sharding_constraint(acc_g, shardings.params)
        return (acc_s + s, acc_c + c, acc_g, q), None
      init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros, state.quant)
      (s, c, g, new_q), _ = jax.lax.scan(body, init, (jnp.arange(n_micro), batch))
    denom = jnp.maximum(c, 1.0)
    before = state
    if qat_kw:   # QAT 'none': the re-estimated ranges (a non-finite step keeps the old ones)
      state = state.replace(quant=new_q)
    if qat_kw:   # QAT: the ranges' update (Adam on the same schedule)
      g, g_ranges = g
      state = _update_ranges(state, jax.tree.map(lambda x: x / denom, g_ranges))
    grads = jax.tree.map(lambda x: x / denom, g)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss = s / denom
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & tree_all_finite(params)
    if qat_kw:
      finite = finite & tree_all_finite(state.quant)
      quant, quant_opt = keep_if_not_finite(finite, (state.quant, state.quant_opt_state),
                                            (before.quant, before.quant_opt_state))
      state = state.replace(quant=quant, quant_opt_state=quant_opt)
    params, opt_state = keep_if_not_finite(finite, (params, opt_state),
                                           (state.params, state.opt_state))
    metrics = {'loss': loss, 'grad_norm': grad_norm,
               'lr': jnp.asarray(schedule(state.step), jnp.float32), 'tokens': c,
               'finite': finite.astype(jnp.float32)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  def _update_ranges(state, g_ranges):
    ranges = qat.split(state.quant, state.learn_ranges)
    if not ranges:
      return state
    upd, ropt = state.range_tx.update(g_ranges, state.quant_opt_state, ranges)
    return state.replace(quant=qat.merge(state.quant, optax.apply_updates(ranges, upd)),
                         quant_opt_state=ropt)

  # (A, B, T) token arrays; a classification head's labels are (A, B).
  # config.loss='distill': 'teacher_hidden' (A, B, T, D).
  ndim = lambda k: 2 if (k == 'labels' and head == 'cls') else 4 if k == 'teacher_hidden' else 3
  bshard = {k: shd.batch_sharding(mesh, ndim(k), batch_dim=1) for k in batch_keys}
  rep = shd.replicated(mesh)
  return jax.jit(train_step, in_shardings=(shardings, bshard),
                 out_shardings=(shardings, rep), donate_argnums=(0,) if donate else ())
