"""SegGPT (Wang et al., 2023) in plain PyTorch.

A ViT over two streams: the *image pair* (prompt image stacked above the input image) and the *mask pair*
(prompt mask above a masked-out target). The streams run as separate rows of one batch, are averaged into one
at `merge_index`, and the layer-normed features of a few layers feed a small convolutional decoder that paints
the mask pair. Parameter names are those of the authors' checkpoint (`seggpt_vit_large.pth`).

Batches are image-major: `num_prompts` consecutive rows share one input image, each with its own prompt.
With `num_prompts > 1` the input half of every attention output is averaged within each group (the authors'
feature ensemble): per stream up to and including the merge layer, over the merged rows after it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import SegGptConfig

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "selu": lambda: nn.SELU(),
}
EMBEDDING_TYPES = ("semantic", "instance")
ATTENTION_BACKENDS = ("sdpa", "flex", "chunked")
_CHUNK_SCORES = 1 << 20  # scores per chunk of the "chunked" backend: 4 MiB in float32


@dataclass
class SegGptOutput:
    pred_masks: torch.Tensor  # (B, 3, 2H, W): the painted mask pair, normalised like the inputs
    loss: torch.Tensor | None = None


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, 3, H, W) -> (B, h, w, C)


class Attention(nn.Module):
    """Global multi-head attention with a decomposed relative-position bias (MViTv2).

    `backend` runs it: "sdpa" adds the bias as a dense (N, N) mask per row and head; "flex" adds it inside
    FlexAttention's kernel from the two small tables (q . R_h, q . R_w), never holding the (N, N) bias in memory
    (compiled on first use; the fast path on CUDA, slower than "sdpa" on CPU); "chunked" runs each head a chunk
    of query rows at a time as two matrix multiplies, the tables broadcast into the chunk's float32 scores (the
    fast path for bfloat16 on the CPU; inference only: where autograd records, it runs "sdpa").
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, grid: tuple[int, int] | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = grid is not None
        self.backend = "sdpa"
        if grid is not None:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid[1] - 1, head_dim))

    def forward(self, prompt: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Attend over the whole grid of each row; returns the heads' output before `proj`, (R, h, w, C).

        `prompt` (R, h/2, w, C) is the top half of each row; `inputs` (R/s, h/2, w, C) the bottom half, shared
        by s consecutive rows, so that its projection is computed once (and copied once, into the grid).
        """
        top, bottom = self.qkv(prompt), self.qkv(inputs)
        shared = top.shape[0] // bottom.shape[0]
        qkv = torch.cat([top.unflatten(0, (-1, shared)), bottom[:, None].expand(-1, shared, -1, -1, -1)], dim=2)
        qkv = qkv.flatten(0, 1)  # (R, h, w, 3C)
        R, h, w, _ = qkv.shape
        q, k, v = qkv.reshape(R, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (R, nh, N, hd) each
        if not self.use_rel_pos:
            x = F.scaled_dot_product_attention(q, k, v)
        elif self.backend == "flex":
            x = _flex_attention(q, k, v, *self._rel_pos_tables(q, h, w), w)
        elif self.backend == "chunked" and not (torch.is_grad_enabled() and q.requires_grad):
            x = _chunked_attention(q, k, v, *self._rel_pos_tables(q.float(), h, w), w)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_bias(*self._rel_pos_tables(q, h, w), h, w))
        return x.transpose(1, 2).reshape(R, h, w, -1)  # (R, nh, N, hd) -> (R, h, w, C)

    def _rel_pos_tables(self, q: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q . R_h[qy - ky] as (R, nh, N, h) and q . R_w[qx - kx] as (R, nh, N, w), contiguous."""
        R, nh, N, hd = q.shape
        r_h = self.rel_pos_h[_relative_index(h, q.device)].to(q.dtype)  # (h, h, hd)
        r_w = self.rel_pos_w[_relative_index(w, q.device)].to(q.dtype)  # (w, w, hd)
        q = q.reshape(R, nh, h, w, hd)
        bias_h = torch.einsum("bnyxc,ykc->bnyxk", q, r_h).reshape(R, nh, N, h)
        bias_w = torch.einsum("bnyxc,xkc->bnyxk", q, r_w).reshape(R, nh, N, w)
        return bias_h, bias_w


def _dense_bias(bias_h: torch.Tensor, bias_w: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """bias[(qy, qx), (ky, kx)] = bias_h[(qy, qx), ky] + bias_w[(qy, qx), kx], as (R, nh, N, N).

    Both tables are contiguous, so the sum is too and the final reshape copies nothing (a sum of the einsum
    outputs as they come would be strided, and the reshape would copy the whole N x N bias once more).
    """
    R, nh, N, _ = bias_h.shape
    return (bias_h.reshape(R, nh, N, h, 1) + bias_w.reshape(R, nh, N, 1, w)).reshape(R, nh, N, N)


def _flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor, bias_w: torch.Tensor, w: int
) -> torch.Tensor:
    """SDPA with the decomposed bias added per score inside FlexAttention's kernel: (R, nh, N, hd)."""

    def add_rel_pos(score, row, head, query, key):
        return score + bias_h[row, head, query, key // w] + bias_w[row, head, query, key % w]

    return _compiled_flex_attention(q.device.type)(q, k, v, score_mod=add_rel_pos)


def _chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor, bias_w: torch.Tensor, w: int
) -> torch.Tensor:
    """SDPA with the decomposed bias, one chunk of query rows of one head at a time: (R, nh, N, hd).

    Per chunk: the scores q . k as one matrix multiply in q's dtype; then in float32 and in place the scale, the
    two tables (bias_h (R, nh, N, h), bias_w (R, nh, N, w)) broadcast over the key grid, and the softmax; the
    probabilities back in q's dtype for the multiply with v. The keys (and values) are taken column by column of
    the grid, so that the broadcasts run along its longer side (h), where they vectorise. A chunk's scores (about
    `_CHUNK_SCORES`) stay in the cache, and no (N, N) tensor is made.
    """
    R, nh, N, hd = q.shape
    h = N // w
    k, v = (t.unflatten(2, (h, w)).transpose(2, 3).flatten(2, 3) for t in (k, v))  # keys (kx, ky), a copy
    rows = -(-N // -(-N * N // _CHUNK_SCORES))  # N split evenly into chunks of at most ~_CHUNK_SCORES scores
    out = q.new_empty(R, nh, N, hd)
    scores = q.new_empty(rows, N)
    in_place = q.dtype == torch.float32  # else the float32 work goes to a buffer of its own
    scores32 = scores if in_place else torch.empty(rows, N, device=q.device)
    for r in range(R):
        for n in range(nh):
            for start in range(0, N, rows):
                stop = min(start + rows, N)
                s, x = scores[: stop - start], scores32[: stop - start]
                torch.mm(q[r, n, start:stop], k[r, n].t(), out=s)
                if not in_place:
                    x.copy_(s)
                grid = x.view(-1, w, h)  # (rows, N) -> (rows, w, h): the scores over the key grid, transposed
                torch.add(bias_h[r, n, start:stop, None, :], grid, alpha=hd**-0.5, out=grid)
                grid.add_(bias_w[r, n, start:stop, :, None])
                torch.softmax(x, dim=-1, out=x)
                if not in_place:
                    s.copy_(x)
                torch.mm(s, v[r, n], out=out[r, n, start:stop])
    return out


@functools.cache
def _compiled_flex_attention(device_type: str):
    """FlexAttention compiled for a device; on the CPU for static shapes (one build per batch shape), since the
    CPU kernel fails to build with dynamic ones (torch 2.13)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


def _relative_index(size: int, device: torch.device) -> torch.Tensor:
    """(size, size) table index of the offset query - key, shifted to start at 0."""
    coords = torch.arange(size, device=device)
    return coords[:, None] - coords[None, :] + (size - 1)


def auto_attention(device: torch.device | str, dtype: torch.dtype) -> str:
    """The fastest measured backend for weights on `device` in `dtype`: "flex" on CUDA; on the CPU "chunked" for
    bfloat16 (its attention twice as fast as "sdpa"'s, which gains nothing from bfloat16: torch 2.13, ViT-L) and
    "sdpa" otherwise (in float32 "chunked" is no faster)."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return "flex"
    return "chunked" if device_type == "cpu" and dtype == torch.bfloat16 else "sdpa"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block over rows split into their prompt (top) and input (bottom) halves.

    The input half of the attention output is averaged over each group of `num_prompts` rows (feature
    ensemble). The input half may be stored once per group (`shared` rows: 1 or `num_prompts`), since after
    the average everything computed from it is the same in every row of the group.
    """

    def __init__(self, config: SegGptConfig, drop_path: float) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        grid = config.grid if config.use_relative_position_embeddings else None
        self.attn = Attention(dim, config.num_attention_heads, config.qkv_bias, grid)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, config.mlp_dim, config.hidden_act)
        self.drop_path = drop_path

    def forward(
        self, prompt: torch.Tensor, inputs: torch.Tensor, num_prompts: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, h/2, w, C) prompt halves and (R/shared, h/2, w, C) input halves -> the same, one layer on."""
        shared = prompt.shape[0] // inputs.shape[0]
        a = self.attn(self.norm1(prompt), self.norm1(inputs))
        a_prompt, a_inputs = a.split(prompt.shape[1], dim=1)
        if num_prompts > 1:
            R, h, w, C = a_inputs.shape
            a_inputs = a_inputs.reshape(R // num_prompts, num_prompts, h, w, C).mean(dim=1)
        a_inputs = _repeat_rows(self.attn.proj(a_inputs), num_prompts // shared)
        keep = _drop_path_scale(prompt, self.drop_path, self.training)  # (R, 1, 1, 1) or None
        prompt = prompt + _scaled(self.attn.proj(a_prompt), keep)
        inputs = inputs + _scaled(a_inputs, keep)
        prompt = prompt + _scaled(self.mlp(self.norm2(prompt)), keep)
        inputs = inputs + _scaled(self.mlp(self.norm2(inputs)), keep)
        return prompt, inputs


def _repeat_rows(x: torch.Tensor, times: int) -> torch.Tensor:
    """Each row `times` times in a row (no copy when once)."""
    return x if times == 1 else x.repeat_interleave(times, dim=0)


def _drop_path_scale(x: torch.Tensor, p: float, training: bool) -> torch.Tensor | None:
    """Stochastic depth while training: per row, 0 (dropped) or 1 / (1 - p); None when inactive."""
    if p == 0.0 or not training:
        return None
    keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device) >= p
    return keep / (1 - p)


def _scaled(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x if scale is None else x * scale


def _merge_streams(half: torch.Tensor) -> torch.Tensor:
    """Average the image-pair rows (first half of the batch) with the mask-pair rows (second half)."""
    n = half.shape[0] // 2
    return (half[:n] + half[n:]) * 0.5


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SegGpt(nn.Module):
    def __init__(self, config: SegGptConfig) -> None:
        super().__init__()
        self.config = config
        dim, p = config.hidden_size, config.patch_size
        self.patch_embed = PatchEmbed(p, config.num_channels, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.segment_token_x = nn.Parameter(torch.zeros(1, 1, 1, dim))  # image-pair stream
        self.segment_token_y = nn.Parameter(torch.zeros(1, 1, 1, dim))  # mask-pair stream
        self.type_token_cls = nn.Parameter(torch.zeros(1, 1, 1, dim))  # "semantic"
        self.type_token_ins = nn.Parameter(torch.zeros(1, 1, 1, dim))  # "instance"
        pretrain_grid = config.pretrain_image_size // p
        self.pos_embed = nn.Parameter(torch.zeros(1, pretrain_grid**2 + 1, dim))  # first entry: unused cls slot
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        decoder_dim = config.decoder_hidden_size
        self.decoder_embed = nn.Linear(dim * len(config.intermediate_hidden_state_indices), p * p * decoder_dim)
        self.decoder_pred = nn.Sequential(
            nn.Conv2d(decoder_dim, decoder_dim, kernel_size=3, padding=1),
            LayerNorm2d(decoder_dim, eps=config.layer_norm_eps),
            _ACTIVATIONS[config.hidden_act](),
            nn.Conv2d(decoder_dim, 3, kernel_size=1),
        )
        if not self.pos_embed.is_meta:  # on the meta device (a checkpoint's shapes) there are no values to set, and
            self.reset_parameters()  # torch would import its compiler (~3 s) to run the init functions there

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random initialisation (truncated normal weights, zero biases), for training from scratch and tests."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, Attention) and module.use_rel_pos:
                nn.init.trunc_normal_(module.rel_pos_h, std=std)
                nn.init.trunc_normal_(module.rel_pos_w, std=std)
        for token in (
            self.mask_token,
            self.segment_token_x,
            self.segment_token_y,
            self.type_token_cls,
            self.type_token_ins,
        ):
            nn.init.normal_(token, std=std)
        nn.init.trunc_normal_(self.pos_embed, std=std)

    def set_attention(self, backend: str) -> SegGpt:
        """Run every attention layer with `backend`: "sdpa", "flex", "chunked" (see `Attention`), or "auto":
        `auto_attention` for the device and dtype of the model's weights (so: set it after moving the model)."""
        if backend == "auto":
            backend = auto_attention(self.pos_embed.device, self.pos_embed.dtype)
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend: expected one of {ATTENTION_BACKENDS}, got {backend!r}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        prompt_pixel_values: torch.Tensor,
        prompt_masks: torch.Tensor,
        *,
        num_prompts: int = 1,
        embedding_type: str = "instance",
        bool_masked_pos: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SegGptOutput:
        """Paint the mask pair. Inputs are (B, 3, H, W), normalised; `labels` (B, 3, H, W) adds the loss.

        `bool_masked_pos` (B or 1, h * w) marks the mask-pair patches replaced by the mask token; by default
        the whole target (bottom) half.
        """
        features = self._encode(
            pixel_values, prompt_pixel_values, prompt_masks, num_prompts, embedding_type, bool_masked_pos, labels
        )
        pred_masks = self._decode([torch.cat(halves, dim=1) for halves in features])
        loss = None
        if labels is not None:
            target = torch.cat([prompt_masks, labels], dim=2)
            loss = self._loss(pred_masks, target, self._masked_positions(bool_masked_pos, pixel_values.device))
        return SegGptOutput(pred_masks=pred_masks, loss=loss)

    @torch.no_grad()
    def predict(
        self,
        pixel_values: torch.Tensor,
        prompt_pixel_values: torch.Tensor,
        prompt_masks: torch.Tensor,
        *,
        num_prompts: int = 1,
        embedding_type: str = "instance",
    ) -> torch.Tensor:
        """The painted input half for each image: (B // num_prompts, 3, H, W).

        Equal to `forward(...).pred_masks[::num_prompts, :, H:]` when the rows of each group share their input
        image (as they should; the first row's is used). The input half is computed once per group, and the
        decoder runs on it alone.
        """
        features = self._encode(
            pixel_values, prompt_pixel_values, prompt_masks, num_prompts, embedding_type, share_inputs=True
        )
        # One row per group; one patch row of the prompt half stays as context for the 3x3 convolution.
        features = [torch.cat([prompt[::num_prompts, -1:], inputs], dim=1) for prompt, inputs in features]
        return self._decode(features)[:, :, self.config.patch_size :]

    def _encode(
        self,
        pixel_values: torch.Tensor,
        prompt_pixel_values: torch.Tensor,
        prompt_masks: torch.Tensor,
        num_prompts: int,
        embedding_type: str,
        bool_masked_pos: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        share_inputs: bool = False,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Layer-normed features of the intermediate layers: (prompt half (B, h/2, w, C), input half).

        The input half has B rows, or B / num_prompts with `share_inputs` (one per group).
        """
        self._check_inputs(pixel_values, prompt_pixel_values, prompt_masks, labels, num_prompts, embedding_type)
        dtype = self.pos_embed.dtype
        images = torch.cat([prompt_pixel_values, pixel_values], dim=2).to(dtype)  # (B, 3, 2H, W)
        target = prompt_masks if labels is None else labels
        masks = torch.cat([prompt_masks, target], dim=2).to(dtype)  # (B, 3, 2H, W)

        x = self.patch_embed(images)  # (B, h, w, C)
        y = self.patch_embed(masks)
        masked = self._masked_positions(bool_masked_pos, x.device).reshape(-1, *x.shape[1:3], 1)
        y = torch.where(masked, self.mask_token, y)
        pos = self._position_embedding(*x.shape[1:3])
        type_token = self.type_token_cls if embedding_type == "semantic" else self.type_token_ins
        x = x + self.segment_token_x + pos + type_token
        y = y + self.segment_token_y + pos + type_token

        # Rows: image-pair stream, then mask-pair stream (2B); each split into its prompt and input halves.
        prompt, inputs = torch.cat([x, y], dim=0).split(x.shape[1] // 2, dim=1)
        if share_inputs:
            inputs = inputs[::num_prompts]
        features = []
        for i, block in enumerate(self.blocks):
            prompt, inputs = block(prompt, inputs, num_prompts)
            if i == self.config.merge_index:
                prompt, inputs = (_merge_streams(half) for half in (prompt, inputs))
            if i in self.config.intermediate_hidden_state_indices:
                features.append((self.norm(prompt), self.norm(inputs)))
        return features

    def _decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(n, h, w, C) features -> (n, 3, h * p, w * p) painted pixels."""
        x = self.decoder_embed(torch.cat(features, dim=-1))  # (n, h, w, p * p * D)
        n, h, w, _ = x.shape
        p = self.config.patch_size
        x = x.reshape(n, h, w, p, p, -1).transpose(2, 3).reshape(n, h * p, w * p, -1)  # (n, H, W, D)
        # Channels-last from here on: the convolutions take it as is, and LayerNorm2d's permute copies nothing.
        return self.decoder_pred(x.permute(0, 3, 1, 2))

    def _masked_positions(self, bool_masked_pos: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """(B or 1, h * w) bool; default: the bottom half of the grid."""
        if bool_masked_pos is not None:
            return bool_masked_pos.to(device=device, dtype=torch.bool)
        rows, cols = self.config.grid
        masked = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        masked[rows // 2 :] = True
        return masked.reshape(1, -1)

    def _position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Absolute position embedding, bicubic-resized from the pretraining grid: (1, h, w, C)."""
        table = self.pos_embed[:, 1:]
        size = int(table.shape[1] ** 0.5)
        table = table.reshape(1, size, size, -1)
        if (size, size) == (h, w):
            return table
        table = F.interpolate(table.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1)

    def _loss(self, pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Smooth-L1 over the pixels of masked patches, in float32."""
        rows, cols = self.config.grid
        p = self.config.patch_size
        weight = masked.reshape(-1, 1, rows, cols).expand(pred.shape[0], -1, -1, -1).float()
        weight = weight.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)  # (B, 1, 2H, W)
        # In float32: a half-precision sum over a whole batch of pixels overflows.
        loss = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=self.config.beta)
        return (loss * weight).sum() / (weight.sum() * pred.shape[1])

    def _check_inputs(
        self,
        pixel_values: torch.Tensor,
        prompt_pixel_values: torch.Tensor,
        prompt_masks: torch.Tensor,
        labels: torch.Tensor | None,
        num_prompts: int,
        embedding_type: str,
    ) -> None:
        expected = (self.config.num_channels, *self.config.input_size)
        named = {
            "pixel_values": pixel_values,
            "prompt_pixel_values": prompt_pixel_values,
            "prompt_masks": prompt_masks,
            "labels": labels,
        }
        for name, tensor in named.items():
            if tensor is not None and (
                tensor.ndim != 4 or tuple(tensor.shape[1:]) != expected or tensor.shape[0] != pixel_values.shape[0]
            ):
                raise ValueError(
                    f"{name}: expected shape ({pixel_values.shape[0]}, {', '.join(map(str, expected))}), "
                    f"got {tuple(tensor.shape)}"
                )
        if num_prompts < 1 or pixel_values.shape[0] % num_prompts:
            raise ValueError(f"num_prompts: {num_prompts} does not divide the batch of {pixel_values.shape[0]} rows")
        if embedding_type not in EMBEDDING_TYPES:
            raise ValueError(f"embedding_type: expected one of {EMBEDDING_TYPES}, got {embedding_type!r}")
