"""Which engine and adapter answer a request's `model`, and under which arm name."""

from __future__ import annotations

from dataclasses import dataclass

from rayft.serving.ab import assign
from rayft.serving.errors import NotFound
from rayft.serving.protocol import AdapterRef


@dataclass(frozen=True)
class Target:
    engine: str  # "base" or a merged model's name
    adapter: AdapterRef | None
    arm: str  # what X-Rayft-Arm says
    experiment: str | None = None


def resolve(
    model: str,
    base_names: tuple[str, ...],
    engines: set[str],
    adapters: dict[str, AdapterRef],
    experiments: dict[str, dict],
    user: str | None,
) -> tuple[Target, Target | None]:
    """(the target that answers, the shadow target or None) for a request's `model` field."""
    if model in experiments:
        exp = experiments[model]
        arm = assign(model, exp["arms"], user)
        answer = _direct(arm, base_names, engines, adapters)
        shadow = exp.get("shadow")
        shadow_t = _direct(shadow, base_names, engines, adapters) if shadow else None
        return (
            Target(answer.engine, answer.adapter, arm, model),
            Target(shadow_t.engine, shadow_t.adapter, shadow, model) if shadow_t else None,
        )
    return _direct(model, base_names, engines, adapters), None


def _direct(
    model: str, base_names: tuple[str, ...], engines: set[str], adapters: dict[str, AdapterRef]
) -> Target:
    if model in base_names:
        return Target("base", None, "base")
    if model in engines:
        return Target(model, None, model)
    name = model
    for prefix in (f"{b}:" for b in base_names):
        if model.startswith(prefix):
            name = model[len(prefix) :]
    if name in adapters:
        return Target("base", adapters[name], name)
    raise unknown_model(model)


def unknown_model(model: str) -> NotFound:
    return NotFound(
        f"The model {model!r} does not exist; GET /v1/models lists what this server answers",
        "model",
        "model_not_found",
    )
