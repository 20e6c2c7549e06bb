"""SegGPT in plain PyTorch: the network, its config, checkpoint loading, and pre/post-processing."""

from model.checkpoint import CheckpointError, check_checkpoint, hf_to_native, load_model
from model.config import SegGptConfig
from model.seggpt import SegGpt, SegGptOutput, auto_attention

__all__ = [
    "CheckpointError",
    "SegGpt",
    "SegGptConfig",
    "SegGptOutput",
    "auto_attention",
    "check_checkpoint",
    "hf_to_native",
    "load_model",
]
