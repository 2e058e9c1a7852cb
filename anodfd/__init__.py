"""AnoDFDNet: pairwise (history vs current) anomaly detection, trained with Ray, tracked in MLflow."""

from anodfd.config import Config, DataConfig, ModelConfig, TrainConfig

__all__ = ["Config", "DataConfig", "ModelConfig", "TrainConfig", "build_model"]


def __getattr__(name: str):
    # `anodfd.build_model` without importing torch for every `anodfd` command (data checks stay quick).
    if name == "build_model":
        from anodfd.model import build_model

        return build_model
    raise AttributeError(name)
