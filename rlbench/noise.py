"""Reward noise: a verifier that is sometimes wrong, injected on purpose.

Real reward signals are noisy (a lenient parser, a mislabelled answer, a reward model's
errors). ``reward_noise`` corrupts the verifier's reward before any algorithm sees it, so a
study can chart each algorithm's robustness against the noise level:

- ``flip_prob``: each completion's reward is flipped with this probability, ``r -> 1 - r``
  (a binary reward turns correct into incorrect and back; a format reward of 0.1 becomes 0.9);
- ``gaussian_std``: ``N(0, std^2)`` is added to every reward (after any flip).

The noise of a completion is drawn from its own stream, a hash of that completion's sampling
seed, so a run repeated gives the same flips, whatever the number of processes or the
micro-batch size, and no other random draw moves when the noise level changes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlbench.config import RewardNoiseConfig
from rlbench.rollout import derive_seed

_NOISE = 0x6E6F697365  # "noise": separates this stream from every other use of a sample's seed
_UNIT = float(2**63)


def uniforms(seeds: list[int], draw: int) -> Tensor:
    """``[len(seeds)]`` float64 uniforms in [0, 1), the ``draw``-th of each seed's noise stream."""
    return torch.tensor([derive_seed(_NOISE, s, draw) / _UNIT for s in seeds], dtype=torch.float64)


def add_noise(clean: Tensor, seeds: list[int], config: RewardNoiseConfig) -> tuple[Tensor, Tensor]:
    """``(noisy, flipped)``: the rewards the algorithm sees and which were flipped (``[B]`` bool).

    ``seeds`` are the completions' sampling seeds, one per reward.
    """
    flipped = torch.zeros_like(clean, dtype=torch.bool)
    noisy = clean
    if config.flip_prob > 0:
        flipped = (uniforms(seeds, 0) < config.flip_prob).to(clean.device)
        noisy = torch.where(flipped, 1.0 - clean, clean)
    if config.gaussian_std > 0:
        # Box-Muller from two uniforms of the same stream
        u1, u2 = uniforms(seeds, 1), uniforms(seeds, 2)
        normal = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)
        noisy = noisy + config.gaussian_std * normal.to(device=clean.device, dtype=clean.dtype)
    return noisy, flipped
