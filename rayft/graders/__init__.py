"""OpenAI's reinforcement fine-tuning graders in pure Python: GRPO's rewards and `rayft eval`'s
scores. docs/graders.md lists the types, their fields and where rayft differs from OpenAI."""

from rayft.graders.grader import Grader, Scores, build, grade
from rayft.graders.spec import GraderError

__all__ = ["Grader", "GraderError", "Scores", "build", "grade"]
