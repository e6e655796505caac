"""Ray Train fine-tuning: `train(cfg, resume=False) -> TrainArtifacts`."""

from rayft.training.checks import TrainConfigError
from rayft.training.driver import TrainArtifacts, TrainingFailedError, train

__all__ = ["TrainArtifacts", "TrainConfigError", "TrainingFailedError", "train"]
