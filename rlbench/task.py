"""The task contract: prompts, a verifier, and demonstrations for a warm start.

A task is deterministic given a seed: the same ``(split, n, seed)`` always yields the same
prompts, and the train and eval splits never share a prompt.

Every task's options dataclass extends ``TaskOptions`` (how prompts are rendered, which
extractor reads the answer, which verifier checks it, the format reward), so those options mean
the same for every task. A verifier reads an answer with ``Task.extract`` (one of
``rlbench.answers``' extractors) and compares it with ``answers_match`` (numbers as numbers),
never by hand; with ``verifier: math_verify`` both go to Hugging Face's math-verify.
"""

from __future__ import annotations

import abc
import string
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from rlbench.answers import (
    EXTRACTORS,
    VERIFIERS,
    answers_match,
    canonical,
    extract,
    math_answer,
    math_answers_match,
    require_math_verify,
)
from rlbench.errors import ConfigError, require

Split = Literal["train", "eval"]

#: A step's ``end`` in ``Task.step_rewards`` for steps the completion never wrote: the reward
#: is placed on the completion's last token (its EOS), after every written step.
STEPS_NOT_WRITTEN = -1


@dataclass(frozen=True)
class Prompt:
    """One problem: ``text`` is what the policy sees (before any chat template); ``answer``
    is what the verifier expects; ``data`` holds whatever else the verifier needs (the numbers
    of a countdown problem, the expected value of each step)."""

    text: str
    answer: str
    data: Any = None


@dataclass
class TaskOptions:
    """Options every task has, beside its own (the ``task:`` section)."""

    prompt_format: Literal["auto", "plain", "chat"] = "auto"
    """How a prompt reaches the model: ``chat`` renders it with the tokenizer's chat template
    (a user turn after the optional system prompt, then the assistant's turn opens), ``plain``
    feeds the text as is, ``auto`` is chat when the tokenizer has a chat template (real instruct
    models) and plain otherwise (the tiny char-tokenizer presets)."""
    system_prompt: str | None = None
    """System turn before each prompt in chat format (ignored in plain format); None: none."""
    prompt_template: str | None = None
    """Wraps each prompt's text before it is rendered, ``{prompt}`` standing for it: an
    instruction a real model needs and a tiny preset does not, e.g. ``"What is {prompt}? Answer
    with just the number."``; None: the text as the task writes it."""
    extractor: str | None = None
    """How the answer is read from a completion before it is checked: ``last_number``,
    ``hash`` (after ``#### ``), ``boxed`` (``\\boxed{x}``), ``answer_tag``
    (``<answer>x</answer>``) or ``exact`` (the whole completion, trimmed); None: the task's
    own choice (with ``verifier: math_verify``: math-verify's own reading of the completion)."""
    verifier: Literal["extractor", "math_verify"] = "extractor"
    """How an answer is checked against the expected one. ``extractor``: the task's own check
    of what ``extractor`` reads (numbers compare as numbers: ``12.0`` is ``12``). ``math_verify``:
    Hugging Face's math-verify (``pip install "rlbench[math]"``) reads the completion, LaTeX
    included, and compares values, for GSM8K and MATH-style answers: ``\\frac{3}{4}`` is 0.75,
    the last ``\\boxed{}`` is the answer whatever numbers follow it, ``25%`` is 0.25 (and 25);
    an ``extractor`` set beside it first cuts out the text it reads (``answer_tag``). For tasks
    whose answer is a number or formula (arithmetic, jsonl, multistep); tasks with a check of
    their own (countdown, sort, reverse) refuse it."""
    format_reward: float = 0.0
    """Reward for a wrong answer that is still well formed (an answer could be extracted, or
    the task's own format check passes); 0 disables it. Correct answers get 1."""

    def __post_init__(self) -> None:
        require(
            self.prompt_format in ("auto", "plain", "chat"),
            "prompt_format",
            self.prompt_format,
            "'auto', 'plain' or 'chat'",
        )
        require(
            self.system_prompt is None or isinstance(self.system_prompt, str),
            "system_prompt",
            self.system_prompt,
            "a string or null",
        )
        require(
            self.prompt_template is None or template_fields(self.prompt_template) == ["prompt"],
            "prompt_template",
            self.prompt_template,
            "null or a string with {prompt} (and no other {field}; write {{ and }} for braces)",
        )
        require(
            self.extractor is None or self.extractor in EXTRACTORS,
            "extractor",
            self.extractor,
            f"null or one of {', '.join(sorted(EXTRACTORS))}",
        )
        require(self.verifier in VERIFIERS, "verifier", self.verifier, f"one of {', '.join(VERIFIERS)}")
        if self.verifier == "math_verify":
            require_math_verify("verifier")  # an extra: missing, it is a config error, not a crash
        require(
            isinstance(self.format_reward, (int, float)) and 0.0 <= self.format_reward < 1.0,
            "format_reward",
            self.format_reward,
            "a number in [0, 1)",
        )


class Task(abc.ABC):
    """Base class of tasks with verifiable rewards. Subclasses set ``Config`` and ``alphabet``;
    the first line of a task's docstring is its description in ``rlbench list``."""

    #: Dataclass of the task's options (the ``task:`` section less ``name``); extends TaskOptions.
    Config: ClassVar[type]
    #: Every character prompts and answers use; only the tiny char-tokenizer presets need it
    #: (None: the task is for real tokenizers only).
    alphabet: ClassVar[str | None] = None
    #: Whether ``reward`` verifies a completion (false: a task that only supplies prompts, so
    #: preference pairs cannot be built from it and must come from a file).
    verifiable: ClassVar[bool] = True
    #: The extractor used when ``task.extractor`` is null.
    default_extractor: ClassVar[str] = "last_number"
    #: Whether ``step_rewards`` scores each reasoning step (process supervision, PRM).
    has_steps: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config
        # math-verify replaces ``is_correct``'s comparison; a task that checks answers its own
        # way (an expression that must reach a target, a list) would silently ignore it
        if self.verifier == "math_verify" and type(self).is_correct is not Task.is_correct:
            raise ConfigError(
                "task.verifier",
                self.verifier,
                f"task {type(self).__name__} checks its answers its own way, so it cannot use "
                "math-verify; math_verify is for tasks whose answer is a number or formula "
                "(arithmetic, jsonl, multistep). Leave task.verifier at extractor",
            )

    @property
    def extractor(self) -> str:
        return getattr(self.config, "extractor", None) or self.default_extractor

    @property
    def verifier(self) -> str:
        """``task.verifier``: ``extractor`` (the default) or ``math_verify``."""
        return getattr(self.config, "verifier", "extractor")

    def math_text(self, completion: str) -> str | None:
        """What math-verify reads: the whole completion, or what an explicit ``task.extractor``
        cuts out of it (None when it finds nothing). The task's default extractor is not used:
        ``last_number`` would turn ``\\frac{3}{4}`` into 4."""
        explicit = getattr(self.config, "extractor", None)
        return completion if explicit is None else extract(explicit, completion)

    def extract(self, completion: str) -> str | None:
        """The answer the task's extractor reads from ``completion`` (None: no answer found);
        with ``verifier: math_verify``, math-verify's reading of it in canonical form."""
        if self.verifier == "math_verify":
            return math_answer(self.math_text(completion))
        return extract(self.extractor, completion)

    def answer_key(self, completion: str) -> str | None:
        """The completion's answer in canonical form (numbers normalised): what ``maj@k`` votes on."""
        answer = self.extract(completion)
        return None if answer is None else canonical(answer)

    @abc.abstractmethod
    def prompts(self, split: Split, n: int, seed: int) -> list[Prompt]:
        """``n`` prompts of ``split``, a pure function of ``(split, n, seed)``."""

    def is_correct(self, prompt: Prompt, completion: str) -> bool:
        """Whether the completion solves the prompt (what ``eval/accuracy`` counts): by default
        the extracted answer matches ``prompt.answer`` (numbers compare as numbers); with
        ``verifier: math_verify``, math-verify finds the completion equal to it."""
        if self.verifier == "math_verify":
            return math_answers_match(self.math_text(completion), prompt.answer)
        return answers_match(self.extract(completion), prompt.answer)

    def reward(self, prompt: Prompt, completion: str) -> float:
        """The verifier's reward for one completion (decoded text, special tokens removed): by
        default 1 if correct, ``format_reward`` if an answer could be extracted, else 0."""
        if self.is_correct(prompt, completion):
            return 1.0
        well_formed = self.extract(completion) is not None
        return float(getattr(self.config, "format_reward", 0.0)) if well_formed else 0.0

    def rewards(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        """Batched form of ``reward``; override when scoring a batch at once is cheaper."""
        return [self.reward(p, c) for p, c in zip(prompts, completions, strict=True)]

    def step_rewards(self, prompt: Prompt, completion: str) -> list[tuple[int, float]]:
        """Process supervision (tasks with ``has_steps``): ``(end, reward)`` per reasoning step
        of the completion, ``end`` the character offset in ``completion`` just past the step's
        last character, in increasing order; a last entry may have ``end =
        STEPS_NOT_WRITTEN``: the reward of steps the completion stopped before (placed on its
        final token). Tasks without steps raise."""
        raise NotImplementedError(f"{type(self).__name__} has no step rewards (has_steps is false)")

    @abc.abstractmethod
    def demonstrations(self, n: int, seed: int) -> list[tuple[str, str]]:
        """``n`` (prompt text, correct completion) pairs from the train split, for warm starts."""


def template_fields(template: object) -> list[str] | None:
    """The distinct ``{field}`` names of a format string; None if it is not one."""
    if not isinstance(template, str):
        return None
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:
        return None
    return sorted(set(names))
