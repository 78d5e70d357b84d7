"""`neo-jax bench ...`: benchmarks users run on their own hardware; each prints one JSON object."""
