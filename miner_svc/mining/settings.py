"""A mining job's settings, checked: what the user asked for, in the miner's own words."""

from __future__ import annotations

import dataclasses
import json

from minehead.core.errors import InvalidArgument

from miner_svc.recipes.background import STAGES, BackgroundPolicy
from miner_svc.recipes.detection_cache import DEFAULT_FLOOR


@dataclasses.dataclass
class MiningSettings:
    """classes: the classes mined; prompts: extra prompts per class (the class name is always
    one); target_precision on the tune split; floor: the detection cache's floor; max_steps: set
    cover stops here; report_fraction: share of images held out for the report; seed: the split's
    seed; background: the head's background policy; auto_tune: sweep min_prob / margin /
    background margin per class; max_images: cap on images (0 = all); hard_negative_min_bg_prob:
    false positives at least this background-probable are kept as hard negatives;
    max_visual_seeds: box exemplars per step when expansion helps."""

    classes: list[str]
    prompts: dict[str, list[str]]
    target_precision: float = 0.75
    floor: float = DEFAULT_FLOOR
    max_steps: int = 3
    report_fraction: float = 0.3
    seed: int = 0
    background: BackgroundPolicy = BackgroundPolicy()
    auto_tune: bool = True
    max_images: int = 0
    hard_negative_min_bg_prob: float = 0.5
    max_visual_seeds: int = 3
    refit_all_images: bool = True
    out_of_fold: bool = True  # a cross-fitted head's fold models score its own labelled images

    def provenance_json(self) -> str:
        """The settings as a recipe's provenance stores them (flat, with the names the recipes
        written so far carry)."""
        bg = self.background
        flat = {"classes": self.classes, "prompts": self.prompts, "target_precision": self.target_precision,
                "floor": self.floor, "max_steps": self.max_steps, "report_fraction": self.report_fraction,
                "seed": self.seed, "guard": bg.veto, "background_margin": bg.margin, "apply": bg.stage,
                "penalty": bg.penalty, "auto_tune": self.auto_tune, "prompt_filter": bg.filter_prompts,
                "prompt_filter_max_veto": bg.filter_max_veto, "prompt_filter_min_seeds": bg.filter_min_seeds,
                "max_images": self.max_images, "hard_negative_min_bg_prob": self.hard_negative_min_bg_prob,
                "max_visual_seeds": self.max_visual_seeds, "refit_all_images": self.refit_all_images,
                "out_of_fold": self.out_of_fold}
        return json.dumps(flat, sort_keys=True, default=str)

    def check(self) -> "MiningSettings":
        """INVALID_ARGUMENT naming the field (by its MiningSpec name) when a value is out of range."""
        bg = self.background
        if not 0 < self.target_precision <= 1:
            raise InvalidArgument(f"target_precision must be in (0, 1], got {self.target_precision}")
        if not 0 <= self.floor < 1:
            raise InvalidArgument(f"floor_threshold must be in [0, 1), got {self.floor}")
        if bg.stage not in STAGES:
            raise InvalidArgument(f"clip_head_background_apply must be seed, final or both, got {bg.stage!r}")
        if not 0 < self.report_fraction < 1:
            raise InvalidArgument(f"report_fraction must be in (0, 1), got {self.report_fraction}")
        if bg.penalty < 0 or bg.margin < -1 or bg.margin > 1:
            raise InvalidArgument("clip_head_background_penalty must be >= 0 and the margin within [-1, 1]")
        return self
