"""The configuration layer: what every other layer is configured by, and imports nothing of
cmal's.

``components`` holds one dataclass per component (the model's parts, data, optim, engine,
checkpoint, observe, cluster, task), the run's :class:`Config` over them, their cross-field
checks and the hash that says whether a checkpoint may resume; ``files`` reads YAML into
those dataclasses (``base:`` files, dotted overrides such as ``model.unified.layers=2``,
type checks with errors that name the file and the key) and writes them back.
"""

from cmal.config.components import (
    DEFAULT_CONCEPTS,
    HASH_EXEMPT,
    HASH_SINCE,
    CheckpointConfig,
    ClusterConfig,
    Config,
    DataConfig,
    EngineConfig,
    LossConfig,
    ModelConfig,
    ObserveConfig,
    OptimConfig,
    PromptConfig,
    SphereConfig,
    TaskConfig,
    TextEncoderConfig,
    UnifiedConfig,
    VisualEncoderConfig,
    config_hash,
    load_config,
    load_profile,
)
from cmal.config.files import ConfigError, fill, parse_override, save_config, to_dict, to_yaml

__all__ = [
    "DEFAULT_CONCEPTS", "HASH_EXEMPT", "HASH_SINCE", "CheckpointConfig", "ClusterConfig",
    "Config", "ConfigError", "DataConfig", "EngineConfig", "LossConfig", "ModelConfig",
    "ObserveConfig", "OptimConfig", "PromptConfig", "SphereConfig", "TaskConfig",
    "TextEncoderConfig", "UnifiedConfig", "VisualEncoderConfig", "config_hash", "fill",
    "load_config", "load_profile", "parse_override", "save_config", "to_dict", "to_yaml",
]  # fmt: skip
