"""`eval`: the arms, generation, task checks, judge and statistics of `rayft eval`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from rayft.config.section import Section


class CheckConfig(Section):
    name: str = Field(description="Name of the task check in the report.")
    kind: Literal["regex", "json_keys", "contains"] = Field(description="What the check tests.")
    pattern: str | None = Field(None, description="Regex (kind=regex) or substring (contains).")
    keys: list[str] = Field(default_factory=list, description="Required keys (kind=json_keys).")

    @model_validator(mode="after")
    def _complete(self) -> CheckConfig:
        if self.kind in ("regex", "contains") and not self.pattern:
            raise ValueError(f"check '{self.name}' (kind={self.kind}) needs a pattern")
        if self.kind == "json_keys" and not self.keys:
            raise ValueError(f"check '{self.name}' (kind=json_keys) needs keys")
        if self.kind == "regex":
            try:
                re.compile(self.pattern or "")
            except re.error as e:
                raise ValueError(f"check '{self.name}': bad regex {self.pattern!r}: {e}") from None
        return self


class JudgeConfig(Section):
    base_url: str = Field(description="OpenAI-compatible endpoint of the judge.")
    model: str = Field(description="Judge model name.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable with its key.")


class LmEvalConfig(Section):
    tasks: list[str] = Field(
        min_length=1,
        description="lm-evaluation-harness task or group names (their data is fetched by "
        "`datasets` where the arm runs) or paths of local task YAML files (*.yaml, *.yml).",
    )
    limit: int | None = Field(None, ge=1, description="Documents per task (None: all).")
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per prompt (None: each task's own default)."
    )

    @model_validator(mode="after")
    def _files_exist(self) -> LmEvalConfig:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: each task once: {self.tasks}")
        for task in self.tasks:
            if task.endswith((".yaml", ".yml")) and not Path(task).is_file():
                raise ValueError(
                    f"task file {task} does not exist (a relative path is read from the "
                    f"working directory, {Path.cwd()}); give the path of an lm-eval task YAML "
                    "or the name of a task lm-eval ships"
                )
        return self


class EvalConfig(Section):
    candidates: list[str] = Field(
        default_factory=lambda: ["adapter"],
        description="Fine-tuned arms: `adapter` / `merged` (this run) or paths to adapters/models.",
    )
    max_examples: int | None = Field(None, ge=1, description="Cap on test examples (None: all).")
    max_new_tokens: int = Field(128, ge=1, description="Generation budget per answer.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (do_sample only).")
    batch_size: int = Field(8, ge=1, description="Prompts per generation batch.")
    num_replicas: int = Field(
        1,
        ge=1,
        description="Model replicas in the Ray Data actor pool (1 CPU each; 1 GPU each with "
        "cluster.use_gpu).",
    )
    checks: list[CheckConfig] = Field(default_factory=list, description="Task checks.")
    judge: JudgeConfig | None = Field(None, description="Optional LLM-as-judge (pairwise).")
    grader: dict[str, Any] | None = Field(
        None,
        description="Score every arm's answers with this grader (an OpenAI grader object or "
        "rayft's json_keys, regex, python; docs/graders.md) against each test row's item, and "
        "compare each candidate with the base (paired CI). None: training.grader when set (the "
        "reward a grpo run trained on), else no grader score. Model graders without their own "
        "base_url use training.grpo.base_url and api_key_env.",
    )
    lm_eval: LmEvalConfig | None = Field(
        None,
        description="Optional lm-evaluation-harness tasks, scored for every arm through the "
        "serving engine; paired CIs where a task scores each document.",
    )
    forgetting: bool = Field(
        True, description="Also compare perplexity on rayft's shipped general-text set."
    )
    max_report_examples: int = Field(
        50, ge=0, description="Examples where the arms differ shown side by side in report.html."
    )
    bootstrap_samples: int = Field(2000, ge=100, description="Bootstrap resamples for CIs.")
    seed: int = Field(0, description="Seed of bootstrap and sampling.")
