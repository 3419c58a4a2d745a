"""The background policy: the head's background veto, under one name everywhere in the miner.

A detection of target class t is vetoed as background when p[t] - max p(background classes) <
margin (design notes section 4). The veto runs at the seed stage (before seeds are expanded), at
the final stage (everything a step outputs), or both; mining adds a penalty for detections the
head calls background, and the prompt filter drops a prompt whose seeds are mostly vetoed.

Users know these settings by the seed briefs' names, kept on the wire (MiningSpec,
recipes.v2.Gate) and in summaries and provenance:

    veto            clip_head_background_guard
    margin          clip_head_background_margin (a recipe's auto-tuned per-class margin is
                    recipes.v2.Gate.background_margin)
    stage           clip_head_background_apply: "seed" | "final" | "both"
    penalty         clip_head_background_penalty (mining's objective only)
    filter_prompts, filter_max_veto, filter_min_seeds
                    prompt_filter, prompt_filter_max_veto, prompt_filter_min_seeds

`minehead.heads.keep_rule.Thresholds` (shared with the head service) is the keep rule's input;
`executor.Gate` builds it from this policy at each stage.
"""

from __future__ import annotations

import dataclasses

STAGES = ("seed", "final", "both")


@dataclasses.dataclass(frozen=True)
class BackgroundPolicy:
    veto: bool = False
    margin: float = 0.0
    stage: str = "final"
    penalty: float = 0.0
    filter_prompts: bool = True
    filter_max_veto: float = 0.8
    filter_min_seeds: int = 5

    @property
    def at_seed(self) -> bool:
        """Seeds are vetoed before expansion."""
        return self.veto and self.stage in ("seed", "both")

    @property
    def at_final(self) -> bool:
        """Everything a step outputs is vetoed."""
        return self.veto and self.stage in ("final", "both")

    def drops_prompt(self, checked: int, vetoed: int) -> bool:
        """The prompt filter: at least filter_min_seeds seeds were checked and more than
        filter_max_veto of them were vetoed (skip the prompt's expansion, or drop the prompt
        while mining)."""
        rate = vetoed / checked if checked else 0.0
        return self.filter_prompts and checked >= self.filter_min_seeds and rate > self.filter_max_veto
