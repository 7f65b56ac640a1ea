"""minids: a small, exact and fast PyTorch re-implementation of the DeepSeek model family."""

from minids.config import ConfigError, ModelConfig, preset_names

__all__ = ["ConfigError", "ModelConfig", "preset_names"]
__version__ = "0.1.0"
