"""Data preparation on Ray Data: `prepare(cfg)` writes `<run_dir>/data/` (docs/contracts.md)."""

from rayft.data.pipeline import DataArtifacts, DataValidationError, prepare
from rayft.data.sources import DataInputError

__all__ = ["DataArtifacts", "DataInputError", "DataValidationError", "prepare"]
