"""oqt_jax: outlier-free, quantizable transformers in JAX/Flax."""
__version__ = '0.1.0'
