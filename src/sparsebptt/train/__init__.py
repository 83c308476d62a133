"""Training loop behind `sparsebptt train`: model, metrics and run folders."""
from .trainer import (METRIC_KEYS, MODELS, RecurrentClassifier, SpikingClassifier, TrainConfig,
                      build_model, default_out_dir, evaluate, train)

__all__ = ["METRIC_KEYS", "MODELS", "RecurrentClassifier", "SpikingClassifier", "TrainConfig",
           "build_model", "default_out_dir", "evaluate", "train"]
