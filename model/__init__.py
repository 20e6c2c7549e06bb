"""SegGPT in plain PyTorch: the network, its config, checkpoint loading, and pre/post-processing."""

from model.config import SegGptConfig
from model.checkpoint import CheckpointError, hf_to_native, load_model, read_config
from model.seggpt import SegGpt, SegGptOutput

__all__ = ["CheckpointError", "SegGpt", "SegGptConfig", "SegGptOutput", "hf_to_native", "load_model", "read_config"]
