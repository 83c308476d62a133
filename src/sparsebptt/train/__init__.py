"""Training behind `sparsebptt train`: the config (`config`), the models built from `sb.Recurrent`
(`models`), the loop (`fit`), run folders and resume (`runs`), DDP (`distributed`)."""
from .config import GATE_INITS, MODELS, TrainConfig
from .fit import METRIC_KEYS, SEQUENCE_METRIC_KEYS, evaluate, train
from .models import RecurrentClassifier, SequenceModel, SpikingClassifier, build_model, chrono_init_
from .runs import RESUME_MAY_CHANGE, RunError, config_from_run, config_mismatches, default_out_dir

__all__ = ["GATE_INITS", "METRIC_KEYS", "MODELS", "SEQUENCE_METRIC_KEYS", "RecurrentClassifier", "SequenceModel",
           "SpikingClassifier", "TrainConfig", "build_model", "chrono_init_", "config_from_run", "config_mismatches",
           "default_out_dir", "evaluate", "train", "RunError", "RESUME_MAY_CHANGE"]
