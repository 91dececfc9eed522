"""Building blocks shared by BERT and OPT: Dense, Embed, LayerNorm with quantization hooks.

Quantization hooks
------------------
Every module takes `quant`: None (floating point) or an object with three methods

  quant.weight(module, name, w)          -> w, possibly fake-quantized
  quant.act(module, name, x, mask)       -> x, possibly fake-quantized
  quant.dot_general(module, name, mask=None)
                                         -> a lax.dot_general replacement (int8 matmuls) or None
  (optional) quant.attend_dot(module, wpoint) -> f(x) giving a tied decoder's logits, or None

`module` is the calling Flax module (the hook may create variables in its scope, e.g. in
the `quant` collection), `name` is the quantization point's name (original point names:
e, Et, s, p, c, g, u, x, h, y, z, P, C, wC, ... with a layer-index suffix inside layers; see
oqt_jax/quant/points.py for the full table; the tied LM decoder's weight point is 'wM') and
`mask` is the (B, T) token-validity mask so padding never enters range statistics. With
quant=None the hooks cost nothing.

Parameters carry logical axis names (`nn.with_logical_partitioning`); `train/sharding.py`
maps them to mesh axes. Activations are pinned with `constrain(x, names)` (MaxText-style
logical constraints: batch, length, length_kv, embed, mlp, heads, kv, vocab); it acts only
while both Flax logical-axis rules and a JAX mesh are in context (the train / eval steps set
them up), so a plain `model.apply` on one device, HF loading and calibration are untouched.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

Dtype = Any

def logical_spec(logical: Sequence[Any] | None, shape: Sequence[int],
                 mesh_shape: Mapping[str, int], rules) -> PartitionSpec:
  """PartitionSpec for one array: map logical names through `rules`, dropping mesh axes that
  are already used by an earlier dimension, have size 1, or do not divide the dimension."""
  if logical is None:
    return PartitionSpec()
  table = {k: v for k, v in rules}
  used: set[str] = set()
  out = []
  for name, dim in zip(tuple(logical), tuple(shape)):
    target = table.get(name) if name is not None else None
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    keep = []
    size = 1
    for ax in axes:
      n = mesh_shape.get(ax, 1)
      if ax in used or n == 1 or dim % (size * n):
        continue
      keep.append(ax)
      size *= n
    used.update(keep)
    out.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def constrain(x, logical: tuple):
  """Sharding constraint on an activation from logical axis names.

  A no-op unless Flax logical-axis rules (`nn.logical_axis_rules`) and a mesh
  (`jax.sharding.use_abstract_mesh` / `jax.set_mesh`) are both in context. Mesh axes that do
  not divide a dimension are dropped (replicated), as for parameters.
  """
  rules = nn.get_logical_axis_rules()
  if not rules:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_spec(logical, x.shape, dict(mesh.shape), rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def dtype_of(name: str):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[name]


def normal_init(std: float):
  return nn.initializers.normal(stddev=std)


def qweight(quant, module, name, w):
  return w if quant is None else quant.weight(module, name, w)


def qact(quant, module, name, x, mask):
  return x if quant is None else quant.act(module, name, x, mask)


def keeps_float32(quant, name) -> bool:
  """True where the hooks quantize point `name` on a grid finer than 16-bit floats hold
  (> 8 bits): the layer then keeps the quantizer's float32 output under bf16 / fp16 compute.
  Optional in the hook protocol (absent: False)."""
  fn = None if quant is None else getattr(quant, 'keeps_float32', None)
  return bool(fn(name)) if fn is not None else False


ACTIVATIONS: dict[str, Callable] = {
    'gelu': lambda x: nn.gelu(x, approximate=False),
    'gelu_new': lambda x: nn.gelu(x, approximate=True),
    'relu': nn.relu,
    'tanh': jnp.tanh,
}


def threefry2x32(k0, k1, x0, x1):
  """Threefry-2x32 (20 rounds; Salmon et al. 2011): the hash of JAX's default PRNG, the same
  words as jax.extend.random.threefry2x32_p, written out so that XLA fuses all rounds into
  one elementwise pass (on CPU JAX lowers the primitive to a rolled loop of five passes)."""
  u32 = lambda v: jnp.asarray(v, jnp.uint32)
  rotl = lambda v, r: (v << u32(r)) | (v >> u32(32 - r))
  ks = (k0, k1, k0 ^ k1 ^ u32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  for i in range(5):
    for r in rotations[i % 2]:
      x0 = x0 + x1
      x1 = rotl(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + u32(i + 1)
  return x0, x1


def dropout_keep_mask(rng, shape, rate: float):
  """Bool array of `shape`, True with probability 1 - rate (to 2^-32).

  Each 32-bit draw is compared with round((1 - rate) 2^32). The draws come from Threefry-2x32
  keyed by two words drawn from `rng` (any JAX key), counting over the array's positions:
  both words of each hash are used, along the last axis (jax.random.bernoulli hashes once
  per element), and the hash is unrolled (threefry2x32). The counters are computed per
  dimension (no flattening), so the mask is the same on any mesh and each device computes
  only its own part."""
  shape = tuple(int(d) for d in shape)
  shape1 = shape or (1,)
  last = shape1[-1]
  bshape = shape1[:-1] + (-(-last // 2),)
  inner = math.prod(bshape[1:])
  if inner >= 2 ** 32 or bshape[0] >= 2 ** 32:
    raise ValueError(f'dropout over {shape}: too many positions for 32-bit counters')
  # Counter words: (position within one row of the leading axis, index along it).
  c0 = jnp.zeros(bshape, jnp.uint32)
  stride = 1
  for d in reversed(range(1, len(bshape))):
    c0 = c0 + jax.lax.broadcasted_iota(jnp.uint32, bshape, d) * jnp.uint32(stride)
    stride *= bshape[d]
  c1 = jax.lax.broadcasted_iota(jnp.uint32, bshape, 0)
  k = jax.random.bits(rng, (2,), jnp.uint32)
  w0, w1 = threefry2x32(k[0], k[1], c0, c1)
  draws = jnp.stack([w0, w1], axis=-1).reshape(bshape[:-1] + (2 * bshape[-1],))
  draws = draws[..., :last].reshape(shape)
  threshold = min(int(round((1.0 - rate) * 2 ** 32)), 2 ** 32 - 1)
  return draws < jnp.uint32(threshold)


class Dropout(nn.Module):
  """Inverted dropout (training: x * keep / (1 - rate), keep from dropout_keep_mask;
  deterministic: x) with the mask drawn from the module's 'dropout' RNG stream, as
  flax.linen.Dropout."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    keep = dropout_keep_mask(self.make_rng('dropout'), x.shape, self.rate)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))


class Dense(nn.Module):
  """y = act(x @ W + b); W of shape (in, out) (the transpose of torch's Linear weight).

  `point` names the output quantization point (quantized after `activation`);
  `wpoint` names the weight's point (defaults to 'w' + point).
  """
  features: int
  point: str
  wpoint: Optional[str] = None
  use_bias: bool = True
  activation: Optional[str] = None
  kernel_axes: tuple = ('embed', 'mlp')
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  quant: Any = None
  quantize_output: bool = True
  kernel_init: Optional[Callable] = None   # None: normal(init_std)
  bias_init: Optional[Callable] = None     # None: zeros

  @nn.compact
  def __call__(self, x, mask=None):
    kernel = self.param('kernel', nn.with_logical_partitioning(
        self.kernel_init or normal_init(self.init_std), self.kernel_axes),
                        (x.shape[-1], self.features), jnp.float32)
    kernel = qweight(self.quant, self, self.wpoint or 'w' + self.point, kernel)
    dot_general = (None if self.quant is None
                   else self.quant.dot_general(self, self.point, mask=mask))
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    # With quantization the output feeds a quantizer: accumulate and quantize in float32,
    # then return to the compute dtype (unless the point's grid needs float32, > 8 bits).
    acc = None if self.quant is None else jnp.float32
    if dot_general is None:
      y = jnp.einsum('...i,io->...o', x, kernel, preferred_element_type=acc)
    else:
      y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
      if acc is not None:
        y = y.astype(acc)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          self.bias_init or nn.initializers.zeros, self.kernel_axes[-1:]),
                        (self.features,), jnp.float32)
      y = y + bias.astype(y.dtype)
    if self.activation is not None:
      y = ACTIVATIONS[self.activation](y)
    if self.quantize_output:
      y = qact(self.quant, self, self.point, y, mask)
    if self.quant is not None and not (self.quantize_output
                                       and keeps_float32(self.quant, self.point)):
      y = y.astype(self.dtype)
    return y


class Embed(nn.Module):
  """Embedding table (num, features); `attend` gives the tied output projection.

  The table's weight point is `wpoint` for lookups; the tied decoder (`attend`) names its
  own weight point (e.g. 'wM'), so the LM head can stay floating point or use other bits.
  """
  num_embeddings: int
  features: int
  wpoint: str
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  quant: Any = None

  @nn.compact
  def __call__(self, ids=None, *, attend_to=None, wpoint=None):
    # One compact method (the quantization hooks may create variables) serving both uses.
    embedding = self.param(
        'embedding', nn.with_logical_partitioning(normal_init(self.init_std), ('vocab', 'embed')),
        (self.num_embeddings, self.features), jnp.float32)
    table = qweight(self.quant, self, wpoint or self.wpoint, embedding).astype(self.dtype)
    if attend_to is not None:   # logits feed a softmax (and a quantizer): float32 accumulation
      # Optional hook: `quant.attend_dot(module, wpoint)` -> f(x) computing the tied head's
      # logits (LLM.int8() of the head), or None (absent: None).
      head = getattr(self.quant, 'attend_dot', None) if self.quant is not None else None
      head = head(self, wpoint or self.wpoint) if head is not None else None
      if head is not None:
        return head(attend_to).astype(jnp.float32)
      return jnp.einsum('...d,vd->...v', attend_to.astype(self.dtype), table,
                        preferred_element_type=jnp.float32)
    # Gather from a table whole along `embed` (FSDP all-gathers it, as for any weight): a
    # lookup into an embed-sharded table cannot be resharded to batch-sharded rows cheaply.
    return jnp.take(constrain(table, ('vocab', None)), ids, axis=0)

  def attend(self, x, wpoint=None):
    return self(attend_to=x, wpoint=wpoint)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32; gamma ('scale') and the output are quantization points.

  `kind='ssnorm'` (Outlier-Safe Pre-training's single-scale RMSNorm): y = x / rms(x) * g with
  rms(x) = sqrt(mean(x^2) + eps) and one learned scalar g ('scale', shape (), init 1); no bias,
  no mean subtraction, so no channel can be scaled on its own.

  `migrated=True` (Gamma Migration / SmoothQuant, see quant/methods/outlier_suppression.py):
  the module has one more parameter, 'migrated_scale' (D,), a per-dim factor f that was
  divided out of this LN (scale and bias hold gamma / f and beta / f) and multiplied into the
  rows of the Linear layers that read the output. The LN output (and its quantizer) is the
  f-free tensor y'; the module returns (y', f) and the caller multiplies f back in where the
  output also feeds a residual branch or a gate (`restore`). Unquantized: f is exact.
  """
  point: str
  eps: float = 1e-12
  dtype: Dtype = jnp.float32
  quant: Any = None
  migrated: bool = False
  kind: str = 'layernorm'

  @nn.compact
  def __call__(self, x, mask=None):
    d = x.shape[-1]
    if self.kind == 'ssnorm':
      g = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ()), (),
                     jnp.float32)
      g = qweight(self.quant, self, 'w' + self.point, g)
      xf = x.astype(jnp.float32)
      y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps) * g
      if self.quant is None:
        return y.astype(self.dtype)
      y = qact(self.quant, self, self.point, y, mask)
      return y if keeps_float32(self.quant, self.point) else y.astype(self.dtype)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (d,), jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)),
                      (d,), jnp.float32)
    scale = qweight(self.quant, self, 'w' + self.point, scale)
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + self.eps) * scale + bias
    if self.quant is None:
      y = y.astype(self.dtype)
    else:
      y = qact(self.quant, self, self.point, y, mask)   # quantized in float32
      y = y if keeps_float32(self.quant, self.point) else y.astype(self.dtype)
    if self.migrated:
      f = self.param('migrated_scale', nn.with_logical_partitioning(nn.initializers.ones,
                                                                    ('norm',)), (d,), jnp.float32)
      return y, f
    return y


def ln_output(out):
  """(y, f) of a LayerNorm call: f is None unless the LN is `migrated`."""
  return out if isinstance(out, tuple) else (out, None)


def restore(y, f):
  """The LN output with its migrated factor multiplied back (y itself when f is None)."""
  return y if f is None else y * f.astype(y.dtype)
