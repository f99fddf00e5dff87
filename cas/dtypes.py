"""config.dtype names -> the jax dtypes of parameters and activations (a leaf module: the pipelines
and cas.config_check read it)."""
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
