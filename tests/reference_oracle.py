"""Test helpers: a randomly initialised `transformers` SegGPT and a feature-ensemble oracle built from its parts.

The oracle re-runs the reference's own submodules (embeddings, encoder layers' attention / MLP / layer norms,
final layer norm, decoder) layer by layer, so the only thing it decides is *where* the input half of the
attention output is averaged:

* ``"authors"``: BAAI `models_seggpt.py` (`Block.forward(merge=...)`, `seggpt_engine.run_one_image`):
  no ensemble for a single prompt; with K > 1 prompts per image, each stream's input half is averaged over
  the image's K rows in every layer ``i <= merge_index`` (``merge = 1 if merge_idx >= idx``), and the
  merged batch's input half over the K rows after it. Applied per group of K consecutive rows.
* ``"hf"``: the `transformers` port with ``feature_ensemble=True`` (``ensemble_cond = 2 if merge_index > i
  else 1``): per-stream before the merge layer (only if the batch has >= 2 rows), across *both* streams at
  the merge layer (even for one row), over the batch after it (>= 2 rows). Whole batch only (one group).
  It exists to check the oracle's plumbing against the reference itself.
"""

from __future__ import annotations

import math

import torch
from transformers import SegGptConfig as HFSegGptConfig
from transformers import SegGptForImageSegmentation


def make_reference(seed: int = 0, **config) -> SegGptForImageSegmentation:
    """The reference in eval mode with random weights in which every parameter matters."""
    torch.manual_seed(seed)
    use_rel = config.get("use_relative_position_embeddings", True)
    if use_rel:
        ref = SegGptForImageSegmentation(HFSegGptConfig(**config)).eval()
    else:
        # transformers' `_init_weights` touches `rel_pos_h` unconditionally, so the reference cannot be built
        # without relative positions: build it with them, then switch them off exactly as its __init__ would.
        ref = SegGptForImageSegmentation(HFSegGptConfig(**dict(config, use_relative_position_embeddings=True))).eval()
        ref.config.use_relative_position_embeddings = False
        for layer in ref.model.encoder.layers:
            layer.attention.use_relative_position_embeddings = False
            del layer.attention.rel_pos_h, layer.attention.rel_pos_w
    randomize_(ref, seed)
    return ref


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with O(1)-scale random values.

    `post_init` leaves biases, layer-norm shifts and relative positions at zero, layer-norm scales at one and
    linear weights at std 0.02 (near-uniform attention). Here weights get std 1/sqrt(fan_in) (activations stay
    O(1) so attention is peaked and the relative-position bias shifts it), biases/tokens/positions/relative
    positions get sizeable noise, and layer-norm scales 1 +- 0.2, so a weight mapped to the wrong place, a
    transposed one, or one left out changes the output.
    """
    gen = torch.Generator().manual_seed(10_000 + seed)

    def noise(p: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std

    for name, p in model.named_parameters():
        if p.ndim >= 2 and "rel_pos" not in name and "position_embeddings" not in name and "token" not in name:
            fan_in = math.prod(p.shape[1:])
            p.copy_(noise(p, 1.0 / math.sqrt(fan_in)))
        elif "layernorm" in name and name.endswith("weight"):
            p.copy_(1.0 + noise(p, 0.2))
        elif "rel_pos" in name:
            p.copy_(noise(p, 0.5))
        elif "token" in name or "position_embeddings" in name:
            p.copy_(noise(p, 0.5))
        else:  # biases, layer-norm shifts
            p.copy_(noise(p, 0.1))


def make_inputs(
    config, num_images: int, num_prompts: int = 1, seed: int = 0, labels: bool = False, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """Image-major inputs: each image repeated `num_prompts` times, every row with its own prompt pair."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    height, width = config.image_size[0] // 2, config.image_size[1]
    shape = (num_images * num_prompts, 3, height, width)
    images = torch.randn((num_images, 3, height, width), generator=gen)
    out = {
        "pixel_values": images.repeat_interleave(num_prompts, dim=0),
        "prompt_pixel_values": torch.randn(shape, generator=gen),
        # masks are a few flat colours in normalised space, like real prompt masks
        "prompt_masks": _blocky(shape, config.patch_size, gen),
    }
    if labels:
        out["labels"] = _blocky(shape, config.patch_size, gen)
    return {k: v.to(dtype) for k, v in out.items()}


def _blocky(shape, patch: int, gen: torch.Generator) -> torch.Tensor:
    b, c, h, w = shape
    coarse = torch.randint(0, 3, (b, 1, h // (patch // 2), w // (patch // 2)), generator=gen).float()
    colours = torch.tensor([[-2.0, -1.8, -1.6], [2.2, -0.4, 0.1], [0.3, 2.4, 2.6]])
    idx = torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")[:, 0].long()
    return colours[idx].permute(0, 3, 1, 2).contiguous()


def random_bool_masked_pos(config, batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(30_000 + seed)
    rows, cols = config.image_size[0] // config.patch_size, config.image_size[1] // config.patch_size
    pos = torch.rand((batch, rows * cols), generator=gen) < 0.5
    pos[:, 0] = True  # never an empty mask (the loss divides by its size)
    return pos


@torch.no_grad()
def ensemble_oracle(
    ref: SegGptForImageSegmentation,
    pixel_values: torch.Tensor,
    prompt_pixel_values: torch.Tensor,
    prompt_masks: torch.Tensor,
    *,
    num_prompts: int,
    embedding_type: str = "instance",
    semantics: str = "authors",
) -> torch.Tensor:
    """`pred_masks` (B, 3, 2H, W) of the reference's parts with the chosen feature-ensemble rule."""
    cfg = ref.config
    batch = pixel_values.shape[0]
    k = num_prompts
    assert batch % k == 0
    groups = batch // k
    if semantics == "hf":
        assert groups == 1, "the transformers rule averages over the whole batch"

    model = ref.model
    pairs = torch.cat((prompt_pixel_values, pixel_values), dim=2)
    mask_pairs = torch.cat((prompt_masks, prompt_masks), dim=2)
    num_patches = model.embeddings.patch_embeddings.num_patches
    bool_masked_pos = torch.zeros(1, num_patches, dtype=torch.bool)
    bool_masked_pos[:, num_patches // 2 :] = True
    hidden = model.embeddings(pairs, mask_pairs, bool_masked_pos=bool_masked_pos, embedding_type=embedding_type)
    # hidden: (2B, rows, cols, C) = [image stream rows 0..B-1; mask stream rows 0..B-1]
    rows = hidden.shape[1]
    half = rows // 2

    def per_stream_mean(x: torch.Tensor) -> torch.Tensor:  # x: (2B, rows, cols, C)
        bottom = x[:, half:].reshape(2, groups, k, rows - half, *x.shape[2:])
        bottom = bottom.mean(dim=2, keepdim=True).expand_as(bottom).reshape(2 * batch, rows - half, *x.shape[2:])
        return torch.cat((x[:, :half], bottom), dim=1)

    def group_mean(x: torch.Tensor) -> torch.Tensor:  # x: (B, ...) after the merge, or (2B, ...) for hf
        n = x.shape[0]
        g = groups if semantics == "authors" else 1
        bottom = x[:, half:].reshape(g, n // g, rows - half, *x.shape[2:])
        bottom = bottom.mean(dim=1, keepdim=True).expand_as(bottom).reshape(n, rows - half, *x.shape[2:])
        return torch.cat((x[:, :half], bottom), dim=1)

    features = []
    for i, layer in enumerate(model.encoder.layers):
        attn = layer.attention(layer.layernorm_before(hidden))[0]
        merged = i > cfg.merge_index
        if semantics == "authors":
            if k > 1:
                attn = group_mean(attn) if merged else per_stream_mean(attn)
        elif semantics == "hf":
            if i < cfg.merge_index:
                if batch >= 2:
                    attn = per_stream_mean(attn)
            elif i == cfg.merge_index:
                attn = group_mean(attn)  # across both streams: 2B rows
            elif batch >= 2:
                attn = group_mean(attn)
        else:
            raise ValueError(semantics)
        hidden = hidden + attn
        hidden = hidden + layer.mlp(layer.layernorm_after(hidden))
        if i == cfg.merge_index:
            hidden = (hidden[:batch] + hidden[batch:]) * 0.5
        if i in cfg.intermediate_hidden_state_indices:
            features.append(model.encoder.layernorm(hidden))
    return ref.decoder(torch.cat(features, dim=-1))
