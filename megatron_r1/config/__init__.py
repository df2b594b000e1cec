"""Typed run configuration (L0): the schema, and loading it from YAML and --set overrides."""

from megatron_r1.config.loader import (
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    write_resolved_config,
)
from megatron_r1.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    GRPOConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RewardConfig,
    RolloutConfig,
    SampleConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "GRPOConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RewardConfig",
    "RolloutConfig",
    "SampleConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "write_resolved_config",
]
