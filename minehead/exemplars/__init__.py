"""Find objects like a few drawn boxes ("exemplars"), with no trained head: prototype matching
on one image's encoder feature map (matching), input checks naming each problem (checks), and
accepted results turned into a YOLO dataset that `heads train` reads (handoff).

The service side (the feature map from the embedder's cache, SAM's decoder refining the kept
boxes, the RPCs) is miner_svc.exemplars; the CLI is `minehead find`."""

from minehead.exemplars.checks import DEFAULT_CLASS, check_exemplars
from minehead.exemplars.matching import ExemplarMatcher, Found, MatchImage, MatchSettings, Prototypes

__all__ = ["DEFAULT_CLASS", "ExemplarMatcher", "Found", "MatchImage", "MatchSettings", "Prototypes", "check_exemplars"]
