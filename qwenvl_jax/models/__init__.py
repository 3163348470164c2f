"""Model families over the shared core (`qwenvl_jax.nn`): one folder each, found through `registry`."""
