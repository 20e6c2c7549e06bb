"""Fine-tuning SegGPT with Ray Train (`train`), its checkpoints and log (`checkpoints`, which `tune` uses too),
and the synthetic tasks of the bundled model (`synthetic`); its config (`config`), whose output, compute and data
sections tuning shares."""

from pipeline.training.checkpoints import (
    IntervalReport,
    complete_checkpoints,
    latest_checkpoint,
    read_log,
    read_trainer_state,
    write_checkpoint,
)
from pipeline.training.config import (
    LabelledDataConfig,
    TrainComputeConfig,
    TrainConfig,
    TrainOutputConfig,
    load_train_config,
)
from pipeline.training.train import train

__all__ = [
    "IntervalReport",
    "LabelledDataConfig",
    "TrainComputeConfig",
    "TrainConfig",
    "TrainOutputConfig",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_train_config",
    "read_log",
    "read_trainer_state",
    "train",
    "write_checkpoint",
]
