"""The fine-tuning API's shapes: what a request may send (`JobCreate`, checked like every other
request by `openai_api.parse`: unknown fields refused) and the objects the routes answer with,
field for field OpenAI's (`openai.types.FineTuningJob`, `FileObject`, events, checkpoints)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

Auto = Literal["auto"]
NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # suffixes and tenants: they become model names
TERMINAL = ("succeeded", "failed", "cancelled")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


PositiveInt = Annotated[StrictInt, Field(gt=0)]
PositiveFloat = Annotated[StrictFloat, Field(gt=0)]


class Hyperparameters(_Strict):
    n_epochs: Auto | PositiveInt | None = None
    batch_size: Auto | PositiveInt | None = None
    learning_rate_multiplier: Auto | PositiveFloat | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Auto | PositiveFloat | None = None


class Supervised(_Strict):
    hyperparameters: Hyperparameters | None = None


class Dpo(_Strict):
    hyperparameters: DpoHyperparameters | None = None


class ReinforcementHyperparameters(Hyperparameters):
    # OpenAI's knobs of its own RL service: accepted as "auto" (what clients send by default),
    # refused otherwise, since rayft's rollouts are set by the server's training.grpo.
    compute_multiplier: Auto | PositiveFloat | None = None
    eval_interval: Auto | PositiveInt | None = None
    eval_samples: Auto | PositiveInt | None = None
    reasoning_effort: Literal["default"] | None = Field(
        None, description="the served models are not reasoning models: only `default`"
    )

    @model_validator(mode="after")
    def _auto_only(self) -> ReinforcementHyperparameters:
        for key in ("compute_multiplier", "eval_samples"):
            if getattr(self, key) not in (None, "auto"):
                raise ValueError(
                    f"{key}: this server samples training.grpo.num_generations completions per "
                    "prompt, set in its job file; send auto"
                )
        return self


class Reinforcement(_Strict):
    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters | None = None


SECTIONS = ("supervised", "dpo", "reinforcement")


class Method(_Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: Reinforcement | None = None

    @model_validator(mode="after")
    def _one_section(self) -> Method:
        for other in SECTIONS:
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"method.{other} is given for a method of type {self.type}")
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError("method.reinforcement (with its grader) is required for its type")
        return self


class JobCreate(_Strict):
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    hyperparameters: Hyperparameters | None = None  # OpenAI's older spelling of method's
    method: Method | None = None
    integrations: list[Any] | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is not None and not NAME.match(v):
            raise ValueError("a suffix is 1 to 64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("metadata holds up to 16 keys of 64 and values of 512 characters")
        return v

    @field_validator("integrations")
    @classmethod
    def _integrations(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError(
                "integrations (Weights & Biases) are not offered: set training.tracking in the "
                "server's job file to log every job there"
            )
        return v

    def kind(self) -> str:
        return self.method.type if self.method else "supervised"

    def hyper(self) -> dict[str, Any]:
        """The hyperparameters asked, wherever they were given ("auto" where not)."""
        inner = None
        if self.method is not None:
            section = getattr(self.method, self.method.type)
            inner = section.hyperparameters if section else None
        if inner is not None and self.hyperparameters is not None:
            raise ValueError("hyperparameters are given twice: send them in method only")
        given = (inner or self.hyperparameters or Hyperparameters()).model_dump()
        keys = ["n_epochs", "batch_size", "learning_rate_multiplier"]
        keys += ["beta"] if self.kind() == "dpo" else []
        keys += ["eval_interval"] if self.kind() == "reinforcement" else []
        return {k: "auto" if given.get(k) is None else given[k] for k in keys}


# ---------------------------------------------------------------------- objects


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def job_object(row: dict[str, Any]) -> dict[str, Any]:
    method = row["method"]
    return {
        "id": row["id"],
        "object": "fine_tuning.job",
        "created_at": row["created_at"],
        "error": row["error"],
        "fine_tuned_model": row["fine_tuned_model"],
        "finished_at": row["finished_at"],
        "hyperparameters": {
            k: v
            for k, v in method[method["type"]]["hyperparameters"].items()
            if k in ("n_epochs", "batch_size", "learning_rate_multiplier")
        },
        "model": row["model"],
        "organization_id": row["tenant"],
        "result_files": row["result_files"],
        "seed": row["seed"],
        "status": row["status"],
        "trained_tokens": row["trained_tokens"],
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "estimated_finish": row["estimated_finish"],
        "integrations": [],
        "metadata": row["metadata"],
        "method": method,
        "user_provided_suffix": row["suffix"],
    }


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "fine_tuning.job.event",
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "data": row["data"] or {},
        "type": row["type"],
    }


def checkpoint_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "fine_tuning.job.checkpoint",
        "created_at": row["created_at"],
        "fine_tuned_model_checkpoint": row["name"],
        "fine_tuning_job_id": row["job_id"],
        "metrics": row["metrics"],
        "step_number": row["step_number"],
    }


def only_query(request, *known: str) -> None:
    """A list route's query: a parameter it does not offer (OpenAI's `metadata[k]` filter, a
    misspelling) is refused, not ignored with every row answered."""
    from rayft.serving.errors import BadRequest

    extra = sorted(set(request.query_params) - set(known))
    if extra:
        raise BadRequest(
            f"Unrecognized request argument supplied: {extra[0]} (this list takes "
            f"{', '.join(known)})",
            extra[0],
            "unknown_parameter",
        )


def page(rows: list[dict[str, Any]], has_more: bool, render) -> dict[str, Any]:
    data = [render(r) for r in rows]
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
