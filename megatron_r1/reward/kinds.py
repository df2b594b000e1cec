"""Which rewards score which rows: R1's all-scenario RL routes each prompt by its kind.

Layer L1 (pure Python and torch). The rule rewards (accuracy, language) score the
completions of `reward.rule_kinds` prompts (reasoning data: math, code); each reward model of
`reward.models` scores the completions of its own kinds (general data: helpfulness, safety),
reading either the final summary or the whole response, as the R1 paper has its helpfulness
and safety models do; the format reward scores every kind unless `reward.format_kinds` says
otherwise (R1: a general sample's reward is its reward models' plus format). A row's total reward is the weighted sum of the components that apply
to its kind; a component that does not apply contributes nothing and is left out of its mean.
Group advantages stay per prompt (a prompt's outputs share its kind).

Shapes: R rows of a rollout, C components (rule components first, then the reward models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_r1.config.schema import RULE_COMPONENTS, RewardConfig
from megatron_r1.reward.accuracy import ANSWER_BLOCK


def summary_text(completion: str) -> str | None:
    """The final summary R1's helpfulness model reads: the last complete
    `<answer>...</answer>` block, else the text after the last `</think>`; None when there is
    none or it is blank (a completion that never finished its reasoning has no summary)."""
    blocks = ANSWER_BLOCK.findall(completion)
    if blocks:
        text = blocks[-1]
    elif "</think>" in completion:
        text = completion.rsplit("</think>", 1)[1]
    else:
        return None
    text = text.strip()
    return text or None


def scored_text(completion: str, scores: Literal["answer", "response"]) -> str | None:
    """What a reward model reads of a completion (RewardModelSpec.scores); None: nothing to
    score, which counts as that reward's failure (0) for the row."""
    if scores == "answer":
        return summary_text(completion)
    return completion if completion.strip() else None


@dataclass(frozen=True, slots=True)
class RewardRouting:
    """The components of a run's reward and the kinds each applies to (known on every rank).

    Args:
        names: component names, the rule rewards first, then the reward models.
        weights: their weights in the total.
        kinds: per component, the prompt kinds it scores.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]
    kinds: tuple[frozenset[str], ...]

    @classmethod
    def from_config(cls, config: RewardConfig) -> RewardRouting:
        rule = frozenset(config.rule_kinds)
        models = tuple(frozenset(m.kinds) for m in config.models)
        layout = frozenset(config.format_kinds) if config.format_kinds is not None else \
            rule.union(*models)
        by_name = {"accuracy": (config.accuracy_weight, rule),
                   "format": (config.format_weight, layout),
                   "language": (config.language_weight, rule)}
        return cls(names=(*RULE_COMPONENTS, *(m.name for m in config.models)),
                   weights=(*(by_name[c][0] for c in RULE_COMPONENTS),
                            *(m.weight for m in config.models)),
                   kinds=(*(by_name[c][1] for c in RULE_COMPONENTS), *models))

    @property
    def rule_kinds(self) -> frozenset[str]:
        """The kinds the accuracy reward verifies (rule_kinds)."""
        return self.kinds[RULE_COMPONENTS.index("accuracy")]

    @property
    def all_kinds(self) -> frozenset[str]:
        return frozenset().union(*self.kinds)

    def applies_RC(self, kinds_R: Sequence[str]) -> torch.Tensor:
        """bool [R, C]: whether component c scores row r."""
        return torch.tensor([[kind in ks for ks in self.kinds] for kind in kinds_R],
                            dtype=torch.bool).view(len(kinds_R), len(self.names))

    def total_R(self, values_RC: torch.Tensor, kinds_R: Sequence[str]) -> torch.Tensor:
        """float32 [R]: sum over the components that apply to each row of weight x value
        (float32, the rule scorer's precision, so a rule-only run adds as it always has)."""
        weights_C = torch.tensor(self.weights, dtype=torch.float32)
        applies = self.applies_RC(kinds_R)
        total = torch.zeros(values_RC.shape[0], dtype=torch.float32)
        for c in range(len(self.names)):
            total += torch.where(applies[:, c], weights_C[c] * values_RC[:, c].float(), 0.0)
        return total

    def metrics(self, values_RC: torch.Tensor, total_R: torch.Tensor,
                kinds_R: Sequence[str]) -> dict[str, float]:
        """`reward/<c>_mean` over the rows each component scores (0 when it scores none),
        `reward/total_mean`, and per kind present `kind/<k>/rows`, `kind/<k>/reward_mean`
        and `kind/<k>/<c>_mean` for the components that score it."""
        applies = self.applies_RC(kinds_R)
        out: dict[str, float] = {}
        for c, name in enumerate(self.names):
            rows = applies[:, c]
            out[f"reward/{name}_mean"] = float(values_RC[rows, c].double().mean()) \
                if rows.any() else 0.0
        out["reward/total_mean"] = float(total_R.double().mean()) if len(kinds_R) else 0.0
        for kind in sorted(set(kinds_R)):
            rows = torch.tensor([k == kind for k in kinds_R])
            out[f"kind/{kind}/rows"] = float(rows.sum())
            out[f"kind/{kind}/reward_mean"] = float(total_R[rows].double().mean())
            for c, name in enumerate(self.names):
                if kind in self.kinds[c]:
                    out[f"kind/{kind}/{name}_mean"] = float(values_RC[rows, c].double().mean())
        return out


def check_prompt_kinds(kinds: Sequence[str], what: Sequence[str], routing: RewardRouting,
                       source: str) -> None:
    """Every prompt's kind must be scored by some component (else its rows would train on a
    reward of 0 forever).

    Args:
        kinds: the prompts' kinds; `what` a short description of each prompt for the error.
        source: where the prompts come from (e.g. "data.path='prompts.jsonl'").

    Raises:
        ValueError: naming the first prompt of an unscored kind.
    """
    known = routing.all_kinds
    for i, kind in enumerate(kinds):
        if kind not in known:
            raise ValueError(
                f"{source}: prompt {i} ({what[i]!r}) has kind {kind!r}, which neither "
                f"reward.rule_kinds nor any reward.models entry scores (scored kinds: "
                f"{sorted(known)})")
