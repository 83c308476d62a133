"""Training loop behind `sparsebptt train`: model, metrics and run folders."""
from .trainer import (GATE_INITS, METRIC_KEYS, MODELS, SEQUENCE_METRIC_KEYS, RecurrentClassifier, SequenceModel,
                      SpikingClassifier, TrainConfig, build_model, chrono_init_, config_from_run, default_out_dir,
                      evaluate, train)
from .runs import RunError

__all__ = ["GATE_INITS", "METRIC_KEYS", "MODELS", "SEQUENCE_METRIC_KEYS", "RecurrentClassifier", "SequenceModel",
           "SpikingClassifier", "TrainConfig",
           "build_model", "chrono_init_", "config_from_run", "default_out_dir", "evaluate", "train", "RunError"]
