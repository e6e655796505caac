"""The base of every config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys are errors (with a did-you-mean, see `job.load_config`): a misspelt key that
    is silently ignored is the most expensive bug a fine-tuning config can have."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
