"""models.layers.Dropout: the mask against a numpy restatement of Threefry-2x32, its rate and
scale, determinism, and that it is what the models use."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oqt_jax import models
from oqt_jax.models import layers

M32 = 0xFFFFFFFF


def _rotl(x, r):
  return ((x << r) | (x >> (32 - r))) & M32


def _threefry2x32(k0, k1, c0, c1):
  """Threefry-2x32, 20 rounds (Salmon et al. 2011), on uint64 arrays holding 32-bit words."""
  ks = [k0, k1, k0 ^ k1 ^ 0x1BD11BDA]
  x0, x1 = (c0 + ks[0]) & M32, (c1 + ks[1]) & M32
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  for i in range(5):
    for r in rotations[i % 2]:
      x0 = (x0 + x1) & M32
      x1 = _rotl(x1, r) ^ x0
    x0 = (x0 + ks[(i + 1) % 3]) & M32
    x1 = (x1 + ks[(i + 2) % 3] + i + 1) & M32
  return x0, x1


def _numpy_keep(rng, shape, rate):
  k0, k1 = (int(v) for v in np.asarray(jax.random.bits(rng, (2,), jnp.uint32)))
  *lead, last = shape
  blocks = -(-last // 2)
  bshape = tuple(lead) + (blocks,)
  flat = np.arange(int(np.prod(bshape)), dtype=np.uint64).reshape(bshape)
  inner = int(np.prod(bshape[1:]))
  c0, c1 = flat % inner, flat // inner        # position within a leading row, leading index
  w0, w1 = _threefry2x32(k0, k1, c0, c1)
  draws = np.stack([w0, w1], -1).reshape(tuple(lead) + (2 * blocks,))[..., :last]
  return draws < round((1 - rate) * 2 ** 32)


def test_threefry_restatement_matches_jax():
  c = np.arange(6, dtype=np.uint32)
  args = (jnp.uint32(7), jnp.uint32(123456789), jnp.asarray(c), jnp.asarray(c[::-1]))
  o0, o1 = jax.extend.random.threefry2x32_p.bind(*args)
  r0, r1 = _threefry2x32(7, 123456789, c.astype(np.uint64), c[::-1].astype(np.uint64))
  np.testing.assert_array_equal(np.asarray(o0), r0)
  np.testing.assert_array_equal(np.asarray(o1), r1)
  u0, u1 = jax.jit(layers.threefry2x32)(*args)          # the unrolled one in the library
  np.testing.assert_array_equal(np.asarray(u0), r0)
  np.testing.assert_array_equal(np.asarray(u1), r1)


@pytest.mark.parametrize('shape', [(3, 2, 5, 7), (4, 8), (9,)])
def test_mask_matches_numpy(shape):
  rng = jax.random.PRNGKey(5)
  keep = layers.dropout_keep_mask(rng, shape, 0.1)
  np.testing.assert_array_equal(np.asarray(keep), _numpy_keep(rng, shape, 0.1))


def test_rate_determinism_and_module():
  rng = jax.random.PRNGKey(0)
  keep = layers.dropout_keep_mask(rng, (64, 1000), 0.1)
  frac = float(jnp.mean(keep))
  assert abs(frac - 0.9) < 5 * np.sqrt(0.09 / 64000)
  again = layers.dropout_keep_mask(rng, (64, 1000), 0.1)
  other = layers.dropout_keep_mask(jax.random.PRNGKey(1), (64, 1000), 0.1)
  assert bool(jnp.all(keep == again)) and not bool(jnp.all(keep == other))
  x = jnp.ones((64, 1000))
  drop = layers.Dropout(0.1)
  y = drop.apply({}, x, deterministic=False, rngs={'dropout': rng})
  assert set(np.unique(np.asarray(y))) == {0.0, np.float32(1.0) / np.float32(0.9)}
  assert abs(float(jnp.mean(y == 0)) - 0.1) < 5 * np.sqrt(0.09 / 64000)
  assert drop.apply({}, x, deterministic=True) is x
  g = jax.grad(lambda v: jnp.sum(drop.apply({}, v, deterministic=False,
                                            rngs={'dropout': rng}) * 2.0))(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(y) * 2.0)


def test_models_use_it():
  cfg = models.ModelConfig(model_type='bert', vocab_size=50, hidden_size=16, num_layers=1,
                           num_heads=2, intermediate_size=32, max_position_embeddings=16,
                           hidden_dropout=0.5, attention_dropout=0.5).validate()
  model = models.build(cfg)
  params = models.init_variables(model, jax.random.PRNGKey(0))['params']
  ids = jnp.ones((2, 8), jnp.int32)
  run = lambda seed: model.apply({'params': params}, ids, deterministic=False,
                                 rngs={'dropout': jax.random.PRNGKey(seed)}).logits
  ours = np.asarray(run(1))
  np.testing.assert_array_equal(ours, np.asarray(run(1)))
  assert not np.allclose(ours, np.asarray(run(2)))
  with pytest.MonkeyPatch.context() as mp:   # flax's own Dropout would give other masks
    from oqt_jax.models import attention, bert
    mp.setattr(bert, 'Dropout', nn.Dropout)
    mp.setattr(attention, 'Dropout', nn.Dropout)
    assert not np.allclose(ours, np.asarray(run(1)))
