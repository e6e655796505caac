"""Evaluation: base vs fine-tuned on the test split, paired statistics, reports.

`evaluate(cfg)` is the stage; `paired_compare` and the metrics are usable on their own.
"""

from rayft.evaluation.stage import EvalArtifacts, evaluate
from rayft.evaluation.stats import paired_compare
from rayft.evaluation.testset import EvalError

__all__ = ["EvalArtifacts", "EvalError", "evaluate", "paired_compare"]
