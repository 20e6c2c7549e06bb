"""The attention backends agree: FlexAttention, which adds the relative-position bias inside its kernel from two
small tables, against SDPA with the dense (N, N) bias. On the CPU in float32 (the same numbers up to rounding), and
where CUDA is present at ViT-L width in bfloat16 (within the bfloat16 bound of the parity tests).

The chunked backend (matrix multiplies per chunk of query rows, the tables broadcast into float32 scores) against a
written-out float64 attention and against SDPA, in float32 and bfloat16, on odd grids, in one chunk and in many;
`auto` picks it for bfloat16 on the CPU."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from reference_oracle import make_inputs
from test_model_parity import CONFIGS, LOWP_BOUND

import model.seggpt
from model import SegGpt, SegGptConfig, auto_attention
from model.seggpt import _chunked_attention, _dense_bias


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
    config = SegGptConfig(
        hidden_size=1024,
        num_attention_heads=16,
        num_hidden_layers=2,
        image_size=[896, 448],
        merge_index=0,
        intermediate_hidden_state_indices=[0, 1],
    )
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


def _written_out_attention(q, k, v, bias_h, bias_w) -> torch.Tensor:
    """softmax(q . k / sqrt(hd) + bias_h[query, ky] + bias_w[query, kx]) . v in float64, the bias made dense."""
    R, nh, N, hd = q.shape
    q, k, v, bias_h, bias_w = (t.double() for t in (q, k, v, bias_h, bias_w))
    bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(R, nh, N, N)  # key (ky, kx) at ky * w + kx
    return torch.softmax(q @ k.transpose(-1, -2) / hd**0.5 + bias, dim=-1) @ v


# (h, w) grids: odd sides, wider than high and higher than wide; R rows (1 or 3, e.g. prompts); chunk sizes in
# scores: one chunk per head, or 100 (chunks of 1 to 5 query rows, the last one shorter).
@pytest.mark.parametrize("chunk_scores", [1 << 20, 100], ids=["one_chunk", "chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("grid", [(5, 3), (3, 7), (6, 9)], ids=str)
def test_chunked_attention_equals_written_out_attention(grid, rows, dtype, chunk_scores, monkeypatch):
    monkeypatch.setattr(model.seggpt, "_CHUNK_SCORES", chunk_scores)
    (h, w), nh, hd = grid, 2, 16
    gen = torch.Generator().manual_seed(0)
    # q, k, v as the model has them: strided views of one (R, N, 3, nh, hd) projection
    q, k, v = torch.randn(rows, h * w, 3, nh, hd, generator=gen).to(dtype).permute(2, 0, 3, 1, 4)
    bias_h = 2 * torch.randn(rows, nh, h * w, h, generator=gen)  # float32, as `Attention` makes them for it
    bias_w = 2 * torch.randn(rows, nh, h * w, w, generator=gen)
    exact = _written_out_attention(q, k, v, bias_h, bias_w)
    out = _chunked_attention(q, k, v, bias_h, bias_w, w)
    assert out.dtype == dtype and out.shape == q.shape
    error = _max_relative_difference(out, exact)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_bias(bias_h.to(dtype), bias_w.to(dtype), h, w))
    if dtype == torch.float32:
        assert error < 1e-6
    else:  # the scores are rounded to bfloat16 once; SDPA also rounds the dense bias (measured: 3-4e-3 vs 7-10e-3)
        assert error < 1e-2
        assert error <= _max_relative_difference(sdpa, exact)
    # the bias matters here: without it the output is far from the exact one
    assert _max_relative_difference(_written_out_attention(q, k, v, 0 * bias_h, 0 * bias_w), exact) > 0.5


# Patch grids with an odd number of columns: 10 x 7 and 6 x 9 (the rows are always even: prompt above input).
ODD_GRIDS = {
    "10x7": dict(
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=3,
        image_size=[80, 56],
        patch_size=8,
        merge_index=1,
        intermediate_hidden_state_indices=[1, 2],
        pretrain_image_size=32,
        decoder_hidden_size=8,
    ),
    "6x9": dict(
        hidden_size=48,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=[96, 144],
        patch_size=16,
        merge_index=0,
        intermediate_hidden_state_indices=[0, 1],
        pretrain_image_size=48,
        decoder_hidden_size=8,
    ),
}


@pytest.mark.parametrize("chunk_scores", [1 << 20, 500], ids=["one_chunk", "chunks"])
@pytest.mark.parametrize("name", ODD_GRIDS)
@torch.no_grad()
def test_chunked_model_equals_sdpa(name, chunk_scores, monkeypatch):
    """The whole model with "chunked" against "sdpa": in float32 the same numbers up to rounding, in bfloat16
    within the parity tests' bound of float32, for 1 and 3 prompts, forward and predict."""
    monkeypatch.setattr(model.seggpt, "_CHUNK_SCORES", chunk_scores)
    torch.manual_seed(0)
    ours = SegGpt(SegGptConfig(**ODD_GRIDS[name])).eval()
    for table in (p for n, p in ours.named_parameters() if "rel_pos" in n):
        table.normal_(std=1.0)  # a bias that moves the output
    for num_prompts, (low, high) in itertools.product((1, 3), ((torch.float32, 1e-5), (torch.bfloat16, None))):
        x = make_inputs(ours.config, num_images=2, num_prompts=num_prompts, seed=num_prompts)
        exact_full = ours.float().set_attention("sdpa")(**x, num_prompts=num_prompts).pred_masks
        exact = ours.predict(**x, num_prompts=num_prompts)
        x = {key: value.to(low) for key, value in x.items()}
        sdpa = ours.to(low).predict(**x, num_prompts=num_prompts)
        chunked_full = ours.set_attention("chunked")(**x, num_prompts=num_prompts).pred_masks
        chunked = ours.predict(**x, num_prompts=num_prompts)
        assert chunked.dtype == low and not torch.equal(chunked, sdpa)  # it ran, and not as SDPA
        bound = high or LOWP_BOUND[low]
        assert _max_relative_difference(chunked_full, exact_full) <= bound
        assert _max_relative_difference(chunked, exact) <= bound
        assert _max_relative_difference(chunked, sdpa) <= bound


def test_auto_attention_is_chunked_for_bfloat16_on_the_cpu():
    model_ = SegGpt(SegGptConfig(**CONFIGS["h32_d2_m0_p8_64x32"]))
    assert {m.backend for m in model_.bfloat16().set_attention("auto").modules() if hasattr(m, "backend")} == {
        "chunked"
    }
    assert {m.backend for m in model_.float().set_attention("auto").modules() if hasattr(m, "backend")} == {"sdpa"}
    assert auto_attention("cpu", torch.bfloat16) == "chunked"
    assert auto_attention(torch.device("cpu"), torch.float32) == auto_attention("cpu", torch.float16) == "sdpa"
    assert auto_attention("cuda", torch.bfloat16) == auto_attention("cuda:0", torch.float32) == "flex"


def test_chunked_attention_under_autograd_runs_sdpa():
    """Training with "chunked" set: the gradients are SDPA's (the chunked path is for inference only)."""
    torch.manual_seed(0)
    ours = SegGpt(SegGptConfig(**CONFIGS["h32_d2_m0_p8_64x32"]))
    x = make_inputs(ours.config, num_images=2, labels=True)
    grads = {}
    for backend in ("sdpa", "chunked"):
        ours.zero_grad()
        torch.manual_seed(1)  # the same stochastic depth
        ours.set_attention(backend)(**x).loss.backward()
        grads[backend] = {name: p.grad.clone() for name, p in ours.named_parameters() if p.grad is not None}
    assert any("rel_pos" in name for name in grads["sdpa"])
    assert grads["chunked"].keys() == grads["sdpa"].keys()
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads["chunked"][name], grad, rtol=0, atol=0, msg=name)
