"""The metric glossary: every metric a run logs, its definition and which algorithms log it.

One table, here. The README's glossary is generated from it (``python -m rlbench.glossary``)
and a test checks that every algorithm logs exactly the metrics the table gives it, under the
same names, so the table, the README and the runs cannot drift apart. A metric that does not
apply to an algorithm (DPO has no clip fraction) is absent from its runs, never a fake zero.
A family of metrics is one entry whose name holds a placeholder: ``eval/pass@<j>`` stands for
``eval/pass@2``, ``eval/pass@4``, ... (``table_name`` maps a logged name to its entry).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ALL = ("grpo", "ppo", "dpo", "rloo")
ON_POLICY = ("grpo", "ppo", "rloo")


@dataclass(frozen=True)
class Metric:
    #: The logged name, or a family's, with ``<j>`` (any placeholder in ``<>``) for a number.
    name: str
    definition: str
    algorithms: tuple[str, ...] = ALL
    #: When it is logged, if not every step ("" for every step).
    when: str = ""


#: Every metric, grouped as the issue tracker and the README discuss them.
METRICS: tuple[Metric, ...] = (
    # reward signal
    Metric(
        "train/reward_mean",
        "mean reward of the step's sampled completions, as the algorithm saw it (after reward noise)",
        when="DPO: on the eval schedule, of fresh samples",
    ),
    Metric(
        "train/reward_clean_mean",
        "mean verifier reward of the same completions before reward noise",
        when="DPO: on the eval schedule",
    ),
    Metric(
        "train/reward_noise_rate",
        "fraction of those rewards flipped by `reward_noise.flip_prob` (0 without noise)",
        when="DPO: on the eval schedule",
    ),
    Metric("train/reward_std", "std (population) of the step's rewards", when="DPO: on the eval schedule"),
    Metric(
        "train/reward_group_std",
        "mean over groups of the within-group reward std (the signal GRPO normalises by)",
        when="DPO: on the eval schedule",
    ),
    Metric(
        "train/frac_zero_std_groups",
        "fraction of groups whose `G` rewards are all equal (no learning signal)",
        when="DPO: on the eval schedule",
    ),
    Metric(
        "train/advantage_abs_mean",
        "mean `|A|` over completion tokens of the advantages the loss uses",
        ON_POLICY,
    ),
    Metric(
        "train/kept_groups",
        "groups trained on after dynamic sampling (= prompts per step without it)",
        ON_POLICY,
    ),
    Metric(
        "train/pair_noise_rate",
        (
            "fraction of preference pairs whose chosen completion the clean verifier does not rank above the "
            "rejected one (label noise)"
        ),
        ("dpo",),
        "pairs built from the verifier",
    ),
    # entropy collapse
    Metric(
        "train/entropy",
        (
            "exact mean token entropy `-sum_v p_v log p_v`, `p = softmax(logits / T)`, over the sampled "
            "completion tokens"
        ),
        when="DPO: on the eval schedule, of fresh samples",
    ),
    Metric(
        "train/entropy_ratio",
        "`train/entropy` over its value at the first step that measured it",
        when="when `train/entropy` is",
    ),
    Metric(
        "train/collapse_step",
        (
            "the first step whose entropy ratio fell below `diagnostics.collapse_threshold` (also "
            "`collapse_step` in `summary.json`, null if never)"
        ),
        when="once, at that step",
    ),
    Metric(
        "train/distinct_completions",
        "mean over groups of (distinct completions / `G`)",
        when="DPO: on the eval schedule",
    ),
    Metric(
        "train/completion_len",
        "mean completion length in tokens (EOS included)",
        when="DPO: on the eval schedule",
    ),
    Metric(
        "train/special_token_frac",
        "fraction of completions holding a special token before their EOS (scored 0)",
        when="DPO: on the eval schedule",
    ),
    # stability
    Metric(
        "train/kl",
        (
            "mean per-token KL estimate to the reference (the algorithm's `kl_estimator`), when a KL term is "
            "in the loss or the reward"
        ),
        ON_POLICY,
        "GRPO, RLOO: `beta > 0`",
    ),
    # RLOO's sequence form with one pass has ratio 1 and no clip: these are absent from its runs
    Metric(
        "train/clip_frac",
        (
            "fraction of completion tokens where the clipped term is active (zero gradient); RLOO's "
            "sequence form: the tokens of completions whose sequence ratio is clipped"
        ),
        ("grpo", "ppo"),
        "every step; RLOO: with `form: token`, or `mu > 1`",
    ),
    Metric(
        "train/ratio_min",
        "min of `pi_theta / pi_old` over completion tokens (RLOO's sequence form: over completions)",
        ("grpo", "ppo"),
        "every step; RLOO: with `form: token`, or `mu > 1`",
    ),
    Metric(
        "train/ratio_max",
        "max of `pi_theta / pi_old` over completion tokens (RLOO's sequence form: over completions)",
        ("grpo", "ppo"),
        "every step; RLOO: with `form: token`, or `mu > 1`",
    ),
    Metric(
        "train/behaviour_logprob_gap",
        (
            "max over tokens of `|log pi_behaviour - log pi_old|`: the sampler's log-probs against the "
            "loss's at pass 0 (0 up to float error)"
        ),
        ON_POLICY,
    ),
    Metric(
        "train/grad_norm",
        (
            "the policy's gradient norm before clipping (PPO's critic apart: `train/value_grad_norm`); "
            "absent while `critic_warmup_steps` freeze the policy"
        ),
    ),
    Metric(
        "train/grad_norm_spikes",
        (
            "steps so far whose grad norm exceeded the trailing `diagnostics.window` steps' mean by "
            "`diagnostics.spike_sigmas` standard deviations"
        ),
    ),
    Metric(
        "train/loss",
        "the algorithm's policy loss (mean over its passes and minibatches; PPO's value loss apart)",
    ),
    Metric("train/loss_std", "std of `train/loss` over the trailing `diagnostics.window` steps"),
    Metric("train/skipped_steps", "updates skipped so far because the loss or a gradient was not finite"),
    Metric("train/lr", "learning rate after the step"),
    # algorithm-specific
    Metric(
        "train/value_loss",
        "PPO's clipped value loss (minimised as `train/loss + vf_coef * value_loss`)",
        ("ppo",),
    ),
    Metric(
        "train/value_grad_norm",
        "PPO's critic gradient norm before clipping (value head or separate critic model), logged apart",
        ("ppo",),
    ),
    Metric(
        "train/value_explained_var",
        (
            "`1 - Var[returns - V_old] / Var[returns]` over completion tokens, `V_old` the critic's values "
            "before this step's updates (a prediction on fresh states)"
        ),
        ("ppo",),
    ),
    Metric("train/returns_mean", "mean GAE return over completion tokens", ("ppo",)),
    Metric("train/values_mean", "mean value `V(s_t)` over completion tokens", ("ppo",)),
    Metric(
        "train/value_clip_frac", "fraction of tokens where the clipped value term is the larger one", ("ppo",)
    ),
    Metric(
        "train/kl_coef",
        "the KL coefficient in the reward after the step (moves with `adaptive_kl`)",
        ("ppo",),
    ),
    Metric(
        "train/reward_accuracy",
        (
            "fraction of pairs whose implicit reward `beta * (log pi - log pi_ref)` is higher for the chosen "
            "completion"
        ),
        ("dpo",),
    ),
    Metric("train/margin", "mean implicit reward margin, chosen minus rejected", ("dpo",)),
    Metric("train/chosen_logratio", "mean `log pi(y) - log pi_ref(y)` of the chosen completions", ("dpo",)),
    Metric(
        "train/rejected_logratio", "mean `log pi(y) - log pi_ref(y)` of the rejected completions", ("dpo",)
    ),
    Metric("train/num_pairs", "preference pairs available (after a refresh, the new set)", ("dpo",)),
    # evaluation
    Metric(
        "eval/accuracy",
        "greedy accuracy on `eval.num_prompts` prompts of the eval split",
        when="before the first step, every `eval.every_n_steps`, after the last",
    ),
    Metric(
        "eval/pass@k",
        (
            "unbiased pass@k, `1 - C(n-c, k) / C(n, k)`, from `k = eval.samples` samples per eval prompt at "
            "`rollout.temperature`"
        ),
        when="with `eval.samples` > 1, at each eval",
    ),
    Metric(
        "eval/maj@k",
        "fraction of eval prompts whose most frequent extracted answer among the k samples is correct",
        when="with `eval.samples` > 1, at each eval",
    ),
    Metric(
        "eval/pass@1",
        "mean fraction of the k samples that are correct (sampled, not greedy, accuracy)",
        when="with `eval.samples` > 1, at each eval",
    ),
    Metric(
        "eval/pass@<j>",
        (
            "unbiased pass@j for j = 2, 4, 8, ... below `eval.samples`, from the same k samples: with "
            "`eval/pass@1` and `eval/pass@k`, the pass@k curve"
        ),
        when="with `eval.samples` > 2, at each eval",
    ),
    # cost axes
    Metric("cost/samples", "completions generated so far (pair building included; evaluations not)"),
    Metric("cost/tokens_generated", "tokens of those completions"),
    Metric(
        "cost/tokens_trained", "completion tokens through forward and backward so far, every pass counted"
    ),
    Metric("cost/wall_s", "seconds of training so far (evaluations included; resumed runs add up)"),
    Metric(
        "perf/samples", "completions generated this step (pair building: at the first step and refreshes)"
    ),
    Metric("perf/tokens_generated", "tokens generated this step"),
    Metric("perf/tokens_trained", "completion tokens trained on this step (times the passes)"),
    Metric("perf/rollout_s", "generation seconds of the step", when="DPO: on the eval schedule"),
    Metric(
        "perf/rollout_tokens_per_s", "generated tokens / generation seconds", when="DPO: on the eval schedule"
    ),
    Metric("perf/step_s", "seconds of rollout + reward + loss + optimiser step(s)"),
)

BY_NAME = {m.name: m for m in METRICS}

_PLACEHOLDER = re.compile(r"<\w+>")
#: The family entries (names with a placeholder), as patterns of the names they stand for.
_FAMILIES = {
    m.name: re.compile("[0-9]+".join(re.escape(part) for part in _PLACEHOLDER.split(m.name)))
    for m in METRICS
    if _PLACEHOLDER.search(m.name)
}

README_BEGIN = "<!-- metric glossary: generated by `python -m rlbench.glossary`, do not edit -->"
README_END = "<!-- end of metric glossary -->"


def logged_by(algorithm: str) -> set[str]:
    """The metric names the table gives ``algorithm``."""
    return {m.name for m in METRICS if algorithm in m.algorithms}


def table_name(name: str) -> str:
    """The table's name for the logged metric ``name``: its own entry's, else the family entry it
    belongs to (``eval/pass@4`` -> ``eval/pass@<j>``); a name the table lacks comes back as is."""
    if name in BY_NAME:
        return name
    return next((family for family, pattern in _FAMILIES.items() if pattern.fullmatch(name)), name)


def markdown() -> str:
    """The glossary as a Markdown table."""
    rows = ["| metric | definition | algorithms | logged |", "|---|---|---|---|"]
    for m in METRICS:
        algorithms = "all" if m.algorithms == ALL else ", ".join(m.algorithms)
        rows.append(f"| `{m.name}` | {m.definition} | {algorithms} | {m.when or 'every step'} |")
    return "\n".join(rows)


def readme_with_glossary(readme: str) -> str:
    """``readme`` with its generated glossary block replaced by the current table."""
    from rlbench.config_help import replace_block

    return replace_block(readme, README_BEGIN, README_END, markdown())


if __name__ == "__main__":  # rewrites the README's glossary from the table
    from pathlib import Path

    path = Path(__file__).parents[1] / "README.md"
    path.write_text(readme_with_glossary(path.read_text()))
    print(f"updated the metric glossary in {path}")
