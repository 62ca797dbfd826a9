"""Training: byte-level data, the paper's two-stage schedule, and the loop with checkpoints and resume."""

from .config import TrainConfig, config_from_run, make_optimizer
from .data import Corpus, get_batch, load_corpus
from .schedule import TwoStageSchedule
from .trainer import evaluate, train

__all__ = ["Corpus", "TrainConfig", "TwoStageSchedule", "config_from_run", "evaluate", "get_batch", "load_corpus", "make_optimizer",
           "train"]
