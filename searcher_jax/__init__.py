"""searcher_jax: R1-Searcher in JAX/Flax NNX."""
