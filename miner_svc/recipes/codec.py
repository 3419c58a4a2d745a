"""A recipe message (recipes.v2) <-> the executor's parameters, both ways, in one place.

Missing background fields (older recipes) are proto3 defaults, which mean "off": veto false,
margin 0, stage final, penalty 0.
"""

from __future__ import annotations

from minehead.recipes.v2 import recipes_pb2

from miner_svc.recipes.background import BackgroundPolicy
from miner_svc.recipes.executor import Gate, Step

STAGE_NAMES = {recipes_pb2.BACKGROUND_APPLY_UNSPECIFIED: "final", recipes_pb2.SEED: "seed", recipes_pb2.FINAL: "final",
               recipes_pb2.BOTH: "both"}
STAGE_PROTO = {"seed": recipes_pb2.SEED, "final": recipes_pb2.FINAL, "both": recipes_pb2.BOTH}


def steps_of(r: recipes_pb2.Recipe) -> list[Step]:
    return [Step(prompt=s.prompt, seed_threshold=s.seed_threshold, expand_threshold=s.expand_threshold,
                 max_visual_seeds=s.max_visual_seeds, seed_dedupe_iou=s.seed_dedupe_iou or 0.5,
                 dedupe_iou=s.dedupe_iou or 0.5, max_results=s.max_results, enabled=s.enabled) for s in r.steps]


def gate_of(r: recipes_pb2.Recipe, filter_prompts: bool = True) -> Gate:
    """The recipe's gate; its background margin is the tuned per-class one when the recipe has it."""
    g = r.gate
    margin = g.background_margin if g.HasField("background_margin") else g.clip_head_background_margin
    return Gate(min_prob=g.min_prob, margin=g.margin,
                background=BackgroundPolicy(veto=g.clip_head_background_guard, margin=margin,
                                            stage=STAGE_NAMES[g.clip_head_background_apply],
                                            penalty=g.clip_head_background_penalty, filter_prompts=filter_prompts))


def step_proto(s: Step) -> recipes_pb2.Step:
    return recipes_pb2.Step(prompt=s.prompt, seed_threshold=s.seed_threshold, expand_threshold=s.expand_threshold,
                            max_visual_seeds=s.max_visual_seeds, seed_dedupe_iou=s.seed_dedupe_iou,
                            dedupe_iou=s.dedupe_iou, max_results=s.max_results, enabled=s.enabled)


def gate_proto(gate: Gate, asked: BackgroundPolicy, tuned: bool) -> recipes_pb2.Gate:
    """A mined gate as the recipe stores it: the veto as it ran (`gate.background.veto`: off for a
    head without background classes), the policy as the user asked for it, and the tuned
    per-class margin (`background_margin`) when the margin was tuned."""
    g = recipes_pb2.Gate(min_prob=gate.min_prob, margin=gate.margin, clip_head_background_guard=gate.background.veto,
                         clip_head_background_margin=asked.margin, clip_head_background_apply=STAGE_PROTO[asked.stage],
                         clip_head_background_penalty=asked.penalty)
    if tuned:
        g.background_margin = gate.background.margin
    return g

