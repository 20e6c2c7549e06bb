"""Prompt sets (`sets`), scoring them on actors (`scoring`), choosing (`select`) and tuning (`tune`) them;
the job's prompts section and the tuning config (`config`)."""

from pipeline.prompts.config import PromptsConfig, TuneConfig, load_tune_config
from pipeline.prompts.select import SelectionError, select_prompts
from pipeline.prompts.sets import PromptSet, PromptSetError, load_prompt_set
from pipeline.prompts.tune import tune

__all__ = [
    "PromptSet",
    "PromptSetError",
    "PromptsConfig",
    "SelectionError",
    "TuneConfig",
    "load_prompt_set",
    "load_tune_config",
    "select_prompts",
    "tune",
]
