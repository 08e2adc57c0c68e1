"""Prompt rendering: plain text for the tiny presets, the chat template for instruct models, the
same rendering for sampling, evaluation and the warm start's demonstrations."""

from __future__ import annotations

import pytest
import torch

from rlbench.errors import RLBenchError
from rlbench.policy import char_tokenizer
from rlbench.prompting import encode_prompts, prompt_token_ids, render, uses_chat
from rlbench.task import TaskOptions
from rlbench.warmstart import encode_demonstrations

# A ChatML-like template over characters the char tokenizer knows.
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)
ALPHABET = "0123456789+-*=<>\nusa Be brief."


@pytest.fixture
def chat_tokenizer():
    tokenizer = char_tokenizer(ALPHABET)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_auto_is_plain_without_a_template_and_chat_with_one(chat_tokenizer):
    plain = char_tokenizer(ALPHABET)
    assert not uses_chat(plain, TaskOptions()) and render(plain, "1+2=", TaskOptions()) == "1+2="
    assert uses_chat(chat_tokenizer, TaskOptions())
    assert render(chat_tokenizer, "1+2=", TaskOptions()) == "<u>1+2=\n<a>"
    assert render(chat_tokenizer, "1+2=", TaskOptions(prompt_format="plain")) == "1+2="


def test_system_prompt_opens_the_chat(chat_tokenizer):
    options = TaskOptions(system_prompt="Be brief.")
    assert render(chat_tokenizer, "1+2=", options) == "<s>Be brief.\n<u>1+2=\n<a>"


def test_prompt_template_wraps_the_text_in_both_formats(chat_tokenizer):
    options = TaskOptions(prompt_template="Be {prompt} brief.", prompt_format="plain")
    assert render(chat_tokenizer, "1+2=", options) == "Be 1+2= brief."
    ids, _ = encode_prompts(chat_tokenizer, ["1+2="], torch.device("cpu"), options)
    assert chat_tokenizer.decode(ids[0]) == "Be 1+2= brief."
    chat = TaskOptions(prompt_template="Be {prompt} brief.")
    assert render(chat_tokenizer, "1+2=", chat) == "<u>Be 1+2= brief.\n<a>"


@pytest.mark.parametrize("template", ["no field", "{prompt} {answer}", "{prompt", "{}"])
def test_a_prompt_template_needs_exactly_the_prompt_field(template):
    with pytest.raises(RLBenchError, match=r"prompt_template=.*\{prompt\}"):
        TaskOptions(prompt_template=template)


def test_chat_without_a_template_is_a_clear_error():
    with pytest.raises(RLBenchError, match="prompt_format='chat'.*no chat template.*'plain'"):
        encode_prompts(
            char_tokenizer(ALPHABET), ["1+2="], torch.device("cpu"), TaskOptions(prompt_format="chat")
        )


def test_a_rendered_prompt_is_tokenized_as_is(chat_tokenizer):
    """The template carries the special tokens a chat model expects; nothing is added to it."""
    chat_ids = prompt_token_ids(chat_tokenizer, "1+2=", TaskOptions())
    assert chat_tokenizer.decode(chat_ids) == "<u>1+2=\n<a>"
    plain_ids = prompt_token_ids(chat_tokenizer, "1+2=", TaskOptions(prompt_format="plain"))
    assert chat_tokenizer.decode(plain_ids, skip_special_tokens=True) == "1+2="


@pytest.mark.parametrize("prompt_format", ["plain", "chat"])
def test_sampling_and_the_warm_start_see_the_same_prompt(chat_tokenizer, prompt_format: str):
    options = TaskOptions(prompt_format=prompt_format, system_prompt="Be brief.")
    ids, mask = encode_prompts(chat_tokenizer, ["1+2=", "12+34="], torch.device("cpu"), options)
    demo_ids, demo_mask, labels = encode_demonstrations(
        chat_tokenizer, [("1+2=", "3"), ("12+34=", "46")], torch.device("cpu"), options
    )
    for row in range(2):
        prompt = ids[row][mask[row] > 0].tolist()
        demo = demo_ids[row][demo_mask[row] > 0].tolist()
        assert demo[: len(prompt)] == prompt  # the demonstration continues the sampled prompt
        target = [t for t in labels[row].tolist() if t != -100]
        assert target == demo[len(prompt) :]  # labels cover the completion and EOS only
        assert target[-1] == chat_tokenizer.eos_token_id
