"""Built-in RL algorithms, one module each; each registers itself with ``rlbench.registry.ALGORITHMS``."""
