"""The job file: one YAML document validated by pydantic, one module per section.

Every field carries its help text (`Field(description=...)`); `rayft config show` prints it and
errors quote it. Unknown keys are errors with a did-you-mean, because a misspelt key that is
silently ignored is the most expensive bug a fine-tuning config can have.
"""

from rayft.config.cluster import ClusterConfig, K8sConfig
from rayft.config.data import DataConfig, DedupeConfig, PIIConfig, SplitConfig
from rayft.config.evaluation import CheckConfig, EvalConfig, JudgeConfig, LmEvalConfig
from rayft.config.export import ExportConfig
from rayft.config.job import (
    ConfigError,
    JobConfig,
    apply_override,
    dump_config,
    field_help,
    load_config,
)
from rayft.config.model import ModelConfig
from rayft.config.serving import (
    VLLM_LORA_RANKS,
    AutoscalingConfig,
    ExperimentConfig,
    ServeConfig,
)
from rayft.config.training import (
    DeepSpeedConfig,
    LoraConfig,
    QuantConfig,
    TrackingConfig,
    TrainingConfig,
)

__all__ = [
    "AutoscalingConfig",
    "CheckConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "DedupeConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ExportConfig",
    "JobConfig",
    "JudgeConfig",
    "K8sConfig",
    "LmEvalConfig",
    "LoraConfig",
    "ModelConfig",
    "PIIConfig",
    "QuantConfig",
    "ServeConfig",
    "SplitConfig",
    "TrackingConfig",
    "TrainingConfig",
    "VLLM_LORA_RANKS",
    "apply_override",
    "dump_config",
    "field_help",
    "load_config",
]
