"""Build a grader from its JSON (OpenAI's reinforcement fine-tuning grader objects, plus rayft's
json_keys, regex and python), and grade a batch of samples with it.

Everything a spec can get wrong is found by `build`, before the first rollout; `grade` then
never raises for one sample's problem (a missing item field, a judge's odd reply): that sample
scores 0 and carries the reason, and the rest of the batch is graded.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass, field

from rayft.graders import model, python, reward, text
from rayft.graders import spec as fields
from rayft.graders.formula import FUNCTIONS, Formula, parse_formula
from rayft.graders.spec import GraderError
from rayft.graders.templates import sample_context

# type -> (required fields, optional fields), besides type, name and pass_threshold.
# base_url, api_key_env, timeout_s (model graders) and timeout_s (python) are rayft's additions.
FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "string_check": ({"input", "reference", "operation"}, set()),
    "text_similarity": ({"input", "reference", "evaluation_metric"}, set()),
    "score_model": (
        {"model", "input"},
        {"range", "sampling_params", "base_url", "api_key_env", "timeout_s"},
    ),
    "label_model": (
        {"model", "input", "labels", "passing_labels"},
        {"sampling_params", "base_url", "api_key_env", "timeout_s"},
    ),
    "python": ({"source"}, {"timeout_s", "image_tag"}),
    "multi": ({"graders", "calculate_output"}, set()),
    "json_keys": ({"keys"}, {"input"}),
    "regex": ({"pattern"}, {"input"}),
    "reward_model": ({"path"}, {"input"}),  # rayft's: a model trained with objective reward
}


@dataclass
class Scores:
    scores: list[float]
    """Per sample, the grader's reward; 0.0 where grading that sample failed."""
    errors: list[str | None]
    """Per sample, None or why grading it failed."""
    parts: dict[str, list[float]]
    """Per name of `Grader.names()`, the per-sample scores (for per-grader means in logs)."""
    passed: list[bool] | None = None
    """Per sample, score >= pass_threshold (False where grading failed); None without one."""

    @property
    def error_count(self) -> int:
        return sum(e is not None for e in self.errors)


@dataclass(frozen=True)
class Grader:
    name: str
    type: str
    rule: object = field(repr=False)
    """The type's rule: `.batch(samples, items) -> (scores, errors)`; a multi's Formula."""
    pass_threshold: float | None = None
    graders: tuple[Grader, ...] = ()
    """A multi's sub-graders, each named by its key in `graders`."""

    def names(self) -> list[str]:
        """This grader's name, then its sub-graders' (a nested multi's as `outer_key.inner_key`)."""
        out = [self.name]
        for g in self.graders:
            out += [g.name] + [f"{g.name}.{n}" for n in g.names()[1:]]
        return out


def build(
    spec: dict,
    *,
    where: str = "grader",
    allow_python: bool = False,
    base_url: str | None = None,
    api_key: str | None = None,
) -> Grader:
    """Check a grader's JSON and build it; GraderError names the first bad field's path.

    allow_python: only for a job file the user runs locally (python graders run its code).
    base_url, api_key: the endpoint of model graders that do not name their own.
    """
    return _build(spec, where, None, (allow_python, base_url, api_key))


def _build(s: object, where: str, key: str | None, options: tuple) -> Grader:
    allow_python, base_url, api_key = options
    kind = s.get("type") if isinstance(s, dict) else None
    if not isinstance(kind, str) or kind not in FIELDS:
        if not isinstance(s, dict):
            raise GraderError(f"{where}: a grader is a JSON object, got {s!r:.100}")
        raise GraderError(f"{where}.type: {kind!r} is not one of {', '.join(FIELDS)}")
    if "api_key" in s:
        raise GraderError(
            f"{where}.api_key: a key does not belong in a job file; put it in an environment "
            "variable and name that variable in api_key_env"
        )
    required, optional = FIELDS[kind]
    # Top-level graders are named by their "name"; a multi's sub-graders by their key in
    # `graders` (what its formula refers to), so their "name" is optional there.
    names = {"name"} if key is None else set()
    fields.check_fields(
        s, where, required | names | {"type"}, optional | {"name", "pass_threshold"}
    )
    name = fields.text(s, "name", where) if key is None else key
    threshold = fields.number(s, "pass_threshold", where)
    if kind == "multi":
        graders, formula = _multi(s, where, name, options)
        return Grader(name, kind, formula, threshold, graders)
    if kind == "string_check":
        rule = text.build_string_check(s, where)
    elif kind == "text_similarity":
        rule = text.build_text_similarity(s, where)
    elif kind == "json_keys":
        rule = text.build_json_keys(s, where)
    elif kind == "regex":
        rule = text.build_regex(s, where)
    elif kind == "score_model":
        rule = model.build_score_model(s, where, base_url, api_key)
    elif kind == "label_model":
        rule = model.build_label_model(s, where, base_url, api_key)
    elif kind == "reward_model":
        rule = reward.build_reward_model(s, where)
    else:
        rule = python.build_python(s, where, allow_python)
    return Grader(name, kind, rule, threshold)


def _multi(s: dict, where: str, name: str, options: tuple) -> tuple[tuple[Grader, ...], Formula]:
    subs = s["graders"]
    if not isinstance(subs, dict) or not subs:
        raise GraderError(
            f"{where}.graders: must be an object of named graders, e.g. "
            '{"exact": {"type": "string_check", ...}}, got ' + f"{subs!r:.100}"
        )
    for key in subs:
        if (
            not isinstance(key, str)
            or not key.isidentifier()
            or keyword.iskeyword(key)
            or key in FUNCTIONS
        ):
            raise GraderError(
                f"{where}.graders.{key}: a sub-grader's key is a name in calculate_output: use "
                f"letters, digits and _ (not starting with a digit), and none of {', '.join(FUNCTIONS)}"
            )
        if key == name:
            raise GraderError(
                f"{where}.graders.{key}: the key repeats the multi grader's own name, and each "
                "is logged under its name; rename one"
            )
    graders = tuple(_build(g, f"{where}.graders.{k}", k, options) for k, g in subs.items())
    formula = parse_formula(s["calculate_output"], list(subs), f"{where}.calculate_output")
    return graders, formula


def grade(grader: Grader, samples: list[dict], items: list[dict]) -> Scores:
    """Grade samples[k] ({"output_text": ...}) against items[k] (the dataset row's fields)."""
    if len(samples) != len(items):
        raise ValueError(f"grade: {len(samples)} samples but {len(items)} items")
    bad = next((i for i in items if not isinstance(i, dict)), None)
    if bad is not None:
        raise TypeError(f"grade: an item is a dict of the row's fields, got {bad!r:.200}")
    return _run(grader, [sample_context(s) for s in samples], items)


def _run(g: Grader, samples: list[dict], items: list[dict]) -> Scores:
    if g.type != "multi":
        scores, errors = g.rule.batch(samples, items)
        parts = {g.name: scores}
    else:
        subs = {c.name: _run(c, samples, items) for c in g.graders}
        scores, errors = _combine(g.rule, subs, len(samples))
        parts = {g.name: scores}
        for key, sub in subs.items():
            parts.update({n if n == key else f"{key}.{n}": v for n, v in sub.parts.items()})
    passed = None
    if g.pass_threshold is not None:
        passed = [e is None and s >= g.pass_threshold for s, e in zip(scores, errors, strict=True)]
    return Scores(scores, errors, parts, passed)


def _combine(formula: Formula, subs: dict[str, Scores], n: int) -> tuple[list, list]:
    scores: list[float] = []
    errors: list[str | None] = []
    for k in range(n):
        failed = next((f"{key}: {s.errors[k]}" for key, s in subs.items() if s.errors[k]), None)
        if failed is None:
            try:
                scores.append(formula({key: s.scores[k] for key, s in subs.items()}))
                errors.append(None)
                continue
            except (ArithmeticError, ValueError) as e:
                failed = f"calculate_output: {type(e).__name__}: {e}"
        scores.append(0.0)
        errors.append(failed)
    return scores, errors
