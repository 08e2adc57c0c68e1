"""rlbench: compare RL fine-tuning algorithms for language models on verifiable-reward tasks."""

__version__ = "0.1.0"
