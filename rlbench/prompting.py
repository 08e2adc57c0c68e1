"""How a task's prompt text reaches the model: plain text, or a turn in the tokenizer's chat template.

An instruct model expects its chat template (``<|im_start|>user ... <|im_start|>assistant``);
fed the bare text it answers worse and may never emit its end-of-turn token. A tiny
char-tokenizer preset has no template and reads the bare text. ``task.prompt_format`` picks
(``auto``: the template when the tokenizer has one), and every encoder of prompts (sampling,
evaluation, pair building, the warm start's demonstrations) goes through ``encode_prompts`` or
``prompt_token_ids`` here, so the model sees a prompt one way only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlbench.errors import RLBenchError


def uses_chat(tokenizer: Any, options: Any) -> bool:
    """Whether prompts are rendered with the chat template under the task ``options``."""
    fmt = getattr(options, "prompt_format", "plain")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "chat" and not has_template:
        raise RLBenchError(
            "task.prompt_format='chat' but the model's tokenizer has no chat template; "
            "use 'plain' (the text as is) or 'auto'"
        )
    return fmt == "chat" or (fmt == "auto" and has_template)


def render(tokenizer: Any, text: str, options: Any) -> str:
    """The prompt as the model reads it: ``text`` (in ``options.prompt_template`` if set) as
    is, or as a chat turn that opens the assistant's reply (after the optional
    ``options.system_prompt``)."""
    template = getattr(options, "prompt_template", None)
    if template:
        text = template.format(prompt=text)
    if not uses_chat(tokenizer, options):
        return text
    messages = []
    system = getattr(options, "system_prompt", None)
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_token_ids(tokenizer: Any, text: str, options: Any = None) -> list[int]:
    """Token ids of one rendered prompt (the template carries its own special tokens)."""
    chat = uses_chat(tokenizer, options)
    return tokenizer(render(tokenizer, text, options), add_special_tokens=not chat)["input_ids"]


def encode_prompts(
    tokenizer: Any, texts: list[str], device: torch.device, options: Any = None
) -> tuple[Tensor, Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of prompts rendered under the task ``options``
    (None: plain text)."""
    chat = uses_chat(tokenizer, options)
    rendered = [render(tokenizer, t, options) for t in texts]
    enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=not chat)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)
