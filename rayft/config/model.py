"""`model`: which base model is fine-tuned."""

from __future__ import annotations

from pydantic import Field, model_validator

from rayft.config.section import Section


class ModelConfig(Section):
    base: str = Field(
        "smollm2-135m-instruct",
        description="Base model: a registry name (`rayft models list`), a local HF model "
        "directory, or a hub id (needs internet and, for remote code, a pinned revision).",
    )
    revision: str | None = Field(
        None, description="Hub revision (commit sha or tag) of the base model."
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow the model's own Python code. Refused unless `revision` pins it.",
    )

    @model_validator(mode="after")
    def _remote_code_needs_revision(self) -> ModelConfig:
        if self.trust_remote_code and not self.revision:
            raise ValueError(
                "model.trust_remote_code needs model.revision pinned to a commit: remote code "
                "from a moving branch can change under you"
            )
        return self
