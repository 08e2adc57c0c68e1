"""The frozen reference policy of a full fine-tune (a LoRA run's is ``lora.AdapterReference``)."""

from __future__ import annotations

from torch import Tensor, nn

from rlbench.algorithm import RolloutBatch
from rlbench.forward import batch_logprobs
from rlbench.policy import inference_mode


class FrozenReference:
    """The reference policy, held outside the module's parameters (not checkpointed, not trained).

    Lightning neither moves nor casts it: ``RLModule.on_fit_start`` gives it the policy's
    device and dtype (under ``bf16-true`` an fp32 reference would make KL non-zero at step 0
    and cost twice the memory).
    """

    def __init__(self, model: nn.Module, vocab_size: int | None = None) -> None:
        self.model = model
        self.vocab_size = vocab_size

    def logprobs(self, batch: RolloutBatch, temperature: float) -> Tensor:
        with inference_mode(self.model):
            return batch_logprobs(self.model, batch, temperature, vocab_size=self.vocab_size)[0]
