"""Training: byte-level data, the paper's two-stage schedule, and the loop with checkpoints and resume."""

from .data import Corpus, get_batch, load_corpus
from .schedule import TwoStageSchedule
from .trainer import TrainConfig, config_from_run, evaluate, make_optimizer, train

__all__ = ["Corpus", "TrainConfig", "TwoStageSchedule", "config_from_run", "evaluate", "get_batch", "load_corpus", "make_optimizer",
           "train"]
