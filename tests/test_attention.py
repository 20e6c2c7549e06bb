"""The attention backends agree: FlexAttention, which adds the relative-position bias inside its kernel from two
small tables, against SDPA with the dense (N, N) bias. On the CPU in float32 (the same numbers up to rounding), and
where CUDA is present at ViT-L width in bfloat16 (within the bfloat16 bound of the parity tests)."""

from __future__ import annotations

import pytest
import torch

from model import SegGpt, SegGptConfig
from reference_oracle import make_inputs
from test_model_parity import CONFIGS, LOWP_BOUND


def _max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@torch.no_grad()
def test_flex_attention_equals_sdpa_on_the_cpu():
    torch.manual_seed(0)
    model = SegGpt(SegGptConfig(**CONFIGS["h32_d2_m0_p8_64x32"])).eval()
    tables = [p for name, p in model.named_parameters() if "rel_pos" in name]
    for table in tables:  # far from the initial ~0.02: a bias that moves the output
        table.normal_(std=1.0)
    x = make_inputs(model.config, num_images=2, num_prompts=2)  # rows sharing their input half, ensembled
    sdpa_full = model.set_attention("sdpa")(**x, num_prompts=2).pred_masks
    sdpa = model.predict(**x, num_prompts=2)
    flex_full = model.set_attention("flex")(**x, num_prompts=2).pred_masks
    flex = model.predict(**x, num_prompts=2)
    assert _max_relative_difference(flex_full, sdpa_full) < 1e-5
    assert _max_relative_difference(flex, sdpa) < 1e-5
    # the bias matters: without it the outputs are far apart, so agreeing above is not for want of a bias
    for table in tables:
        table.zero_()
    assert _max_relative_difference(model.predict(**x, num_prompts=2), sdpa) > 1e-2


def test_auto_attention_is_sdpa_on_the_cpu_and_unknown_backends_are_refused():
    model = SegGpt(SegGptConfig(**CONFIGS["h32_d2_m0_p8_64x32"]))

    def backends() -> set[str]:
        return {module.backend for module in model.modules() if hasattr(module, "backend")}

    assert backends() == {"sdpa"}
    model.set_attention("flex")
    assert backends() == {"flex"}
    model.set_attention("auto")
    assert backends() == {"sdpa"}
    with pytest.raises(ValueError, match="attention backend: expected one of"):
        model.set_attention("xformers")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@torch.no_grad()
def test_flex_attention_equals_sdpa_on_cuda_in_bfloat16():
    config = SegGptConfig(hidden_size=1024, num_attention_heads=16, num_hidden_layers=2, image_size=[896, 448],
                          merge_index=0, intermediate_hidden_state_indices=[0, 1])
    torch.manual_seed(0)
    model = SegGpt(config).eval().cuda()
    for num_prompts in (1, 3):
        x = {k: v.cuda() for k, v in make_inputs(config, num_images=2, num_prompts=num_prompts, seed=0).items()}
        exact = model.float().set_attention("sdpa").predict(**x, num_prompts=num_prompts)
        low = {k: v.bfloat16() for k, v in x.items()}
        sdpa = model.bfloat16().set_attention("sdpa").predict(**low, num_prompts=num_prompts)
        flex = model.set_attention("flex").predict(**low, num_prompts=num_prompts)
        assert _max_relative_difference(flex, exact) <= LOWP_BOUND[torch.bfloat16]
        assert _max_relative_difference(flex, sdpa) <= LOWP_BOUND[torch.bfloat16]
