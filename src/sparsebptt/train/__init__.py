"""Training: `sb.fit` (any model, any Dataset) and `sparsebptt train` behind it: the configs
(`config`), the CLI's models built from `sb.Recurrent` (`models`), the loop (`fit`), a user's
Datasets as batches (`datasets`), run folders and resume (`runs`), DDP (`distributed`)."""
from .config import GATE_INITS, MODELS, FitConfig, TrainConfig
from .datasets import TorchDatasets, collate_time_major
from .fit import METRIC_KEYS, SEQUENCE_METRIC_KEYS, apply_strategy, evaluate, train  # sb.fit: fit.fit
from .models import RecurrentClassifier, SequenceModel, SpikingClassifier, build_model, chrono_init_
from .runs import RESUME_MAY_CHANGE, RunError, config_from_run, config_mismatches, default_out_dir

__all__ = ["FitConfig", "TorchDatasets", "apply_strategy", "collate_time_major", "GATE_INITS", "METRIC_KEYS",
           "MODELS", "SEQUENCE_METRIC_KEYS", "RecurrentClassifier", "SequenceModel",
           "SpikingClassifier", "TrainConfig", "build_model", "chrono_init_", "config_from_run", "config_mismatches",
           "default_out_dir", "evaluate", "train", "RunError", "RESUME_MAY_CHANGE"]
