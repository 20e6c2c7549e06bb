"""`model` times our `SegGpt.predict` against `transformers.SegGptForImageSegmentation` at the same config, batch
and prompts, each variant in its own process as a user runs it, alternated round by round so that the machine's
drift hits all of them: ours at each `--dtypes` (as the inference actor runs it: on the CPU with freed memory kept
for reuse, `model.memory`), the reference as it comes, and on the CPU the reference with glibc's malloc tuned the
same way by environment, so that nobody mistakes the allocator's gain for ours. Images/s, the ratios, TFLOP/s of
our predict's work (counted by torch) and, on a GPU, its share of the GPU's dense peak (MFU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from jobs.benchmark.harness import finish_parser, peak_kib, run_child, sync, write_record
from model import SegGpt, SegGptConfig
from model.checkpoint import DTYPES
from model.memory import KEEP_FREED_MEMORY_ENV

# Dense matrix-multiply peaks (TFLOP/s, no sparsity) of GPUs, by a word of their name, for MFU.
GPU_PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},  # SXM; the PCIe card is 756 / 51
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
    "L4": {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3},
}


def vit_large(layers: int) -> dict:
    """ViT-L's width and resolution with fewer layers; merge and feature layers kept within them."""
    return {
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "num_hidden_layers": layers,
        "image_size": [896, 448],
        "merge_index": min(2, layers - 1),
        "intermediate_hidden_state_indices": sorted({min(i, layers - 1) for i in (5, 11, 17, 23)} | {layers - 1}),
    }


def model_flops(config: dict, batch: int, prompts: int) -> int:
    """FLOPs of our `predict` on `batch` images x `prompts` prompts, counted by torch on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = SegGpt(SegGptConfig(**config)).eval()
        inputs = [torch.empty(batch * prompts, 3, *model.config.input_size) for _ in range(3)]
        with FlopCounterMode(display=False) as counter:
            model.predict(*inputs, num_prompts=prompts)
    return counter.get_total_flops()


def gpu_peak_tflops(dtype: str) -> float | None:
    """The datasheet peak of this GPU at `dtype` (`GPU_PEAK_TFLOPS`), None for a GPU not listed."""
    name = torch.cuda.get_device_name()
    return next((peaks[dtype] for word, peaks in GPU_PEAK_TFLOPS.items() if word in name), None)


def matmul_shapes(config: dict, batch: int, prompts: int) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of the multiplies that measure the matrix-multiply peak: 4096 x 1024 @ 1024 x 4096, and the model's
    own linear layers (qkv, proj, fc1, fc2) on the tokens of one half of the grid of every row."""
    model_config = SegGptConfig(**config)
    rows, cols = model_config.grid
    tokens, dim, hidden = batch * prompts * rows // 2 * cols, model_config.hidden_size, model_config.mlp_dim
    return {
        "4096x1024x4096": (4096, 1024, 4096),
        "qkv": (tokens, dim, 3 * dim),
        "proj": (tokens, dim, dim),
        "fc1": (tokens, dim, hidden),
        "fc2": (tokens, hidden, dim),
    }


def matmul_tflops(
    shapes: dict[str, tuple[int, int, int]], device: torch.device, dtype: torch.dtype, min_seconds: float = 0.2
) -> dict[str, float]:
    """TFLOP/s of each (M, K, N) multiply as the model's linear layers run it (`F.linear` with a bias), in this
    process (its threads, its allocator): the best of 3 runs of at least `min_seconds` each, after a warm-up."""
    rates = {}
    with torch.inference_mode():
        for name, (m, k, n) in shapes.items():
            x, weight = torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
            bias = torch.randn(n, device=device, dtype=dtype)
            torch.nn.functional.linear(x, weight, bias)
            best = 0.0
            for _ in range(3):
                calls, start = 0, time.perf_counter()
                sync(device)
                while calls < 2 or time.perf_counter() - start < min_seconds:
                    torch.nn.functional.linear(x, weight, bias)
                    calls += 1
                    if calls % 8 == 0:
                        sync(device)
                sync(device)
                best = max(best, 2 * m * k * n * calls / (time.perf_counter() - start) / 1e12)
            rates[name] = best
    return rates


def matmul_peaks(results: dict[str, dict], dtypes: dict[str, str]) -> dict[str, dict]:
    """Per dtype: each shape's median TFLOP/s over the measuring processes of that dtype (`matmul_tflops` of every
    variant's processes), and the peak: the best of those medians."""
    peaks = {}
    for dtype in sorted(set(dtypes.values())):
        runs = [run for name, result in results.items() if dtypes[name] == dtype for run in result["matmul_tflops"]]
        shapes = {shape: statistics.median(run[shape] for run in runs) for shape in runs[0]}
        peaks[dtype] = {"tflops": max(shapes.values()), "shapes": shapes, "processes": len(runs)}
    return peaks


def _model_child(spec: dict) -> None:
    """Body of one measuring process: build one model, warm it up, time `iters` batches, then the matrix-multiply
    peak (`matmul_tflops`, same device, dtype and threads), print JSON."""
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    config, k, batch = vit_large(spec["layers"]), spec["prompts"], spec["batch"]
    torch.manual_seed(0)
    if spec["impl"] == "reference":
        import transformers  # the reference: a test dependency, needed only here

        reference = transformers.SegGptForImageSegmentation(transformers.SegGptConfig(**config)).eval()
        reference.to(device, dtype)
        attention = None  # its own

        def run(images, prompt_images, prompt_masks):
            return reference(images, prompt_images, prompt_masks, feature_ensemble=k > 1).pred_masks[::k, :, 448:]
    else:
        ours = SegGpt(SegGptConfig(**config)).eval().to(device, dtype)
        ours.set_attention(spec["attention"])
        attention = next(module.backend for module in ours.modules() if hasattr(module, "backend"))

        def run(images, prompt_images, prompt_masks):
            return ours.predict(images, prompt_images, prompt_masks, num_prompts=k)

    inputs = [torch.randn(batch * k, 3, 448, 448, device=device, dtype=dtype) for _ in range(3)]
    inputs[0] = inputs[0][::k].repeat_interleave(k, dim=0)  # one image per group
    times = []
    with torch.inference_mode():
        for i in range(spec["iters"] + 1):  # the first: warm-up (and compilation)
            sync(device)
            start = time.perf_counter()
            run(*inputs)
            sync(device)
            if i:
                times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "times": times,
                "peak_rss_kib": peak_kib(),
                "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
                "attention": attention,
                "matmul_tflops": matmul_tflops(matmul_shapes(config, batch, k), device, dtype),
            }
        )
    )


def _run_model_child(spec: dict, tuned_malloc: bool) -> dict:
    """One measuring process; glibc's malloc as it comes, or tuned by environment (`KEEP_FREED_MEMORY_ENV`, as the
    inference actor runs)."""
    env = {name: value for name, value in os.environ.items() if name not in KEEP_FREED_MEMORY_ENV}
    env.update(KEEP_FREED_MEMORY_ENV if tuned_malloc else {})
    return run_child(_model_child, spec, env=env, name=spec["impl"])


def _variants(args: argparse.Namespace) -> dict[str, tuple[dict, bool]]:
    """Each variant's name: what its processes build, and whether they tune malloc. Ours runs with the inference
    actor's allocator settings on the CPU."""
    on_cpu = args.device == "cpu"
    variants = {f"ours {dtype}": ({"impl": "ours", "dtype": dtype}, on_cpu) for dtype in args.dtypes}
    variants[f"reference {args.reference_dtype}"] = ({"impl": "reference", "dtype": args.reference_dtype}, False)
    if on_cpu:
        variants[f"reference {args.reference_dtype}, tuned malloc"] = (
            {"impl": "reference", "dtype": args.reference_dtype},
            True,
        )
    return variants


def _measure(variants: dict[str, tuple[dict, bool]], common: dict, rounds: int) -> dict[str, dict]:
    """Every variant's process once per round, in turn (A B C A B C): its times, matmul rates and peaks."""
    results: dict[str, dict] = {
        name: {"times": [], "peak_rss_kib": 0, "peak_gpu_bytes": 0, "matmul_tflops": []} for name in variants
    }
    for round_number in range(rounds):
        for name, (spec, tuned_malloc) in variants.items():
            out = _run_model_child({**common, **spec}, tuned_malloc)
            results[name]["times"] += out["times"]
            results[name]["matmul_tflops"].append(out["matmul_tflops"])
            results[name]["attention"] = out["attention"]
            results[name]["peak_rss_kib"] = max(results[name]["peak_rss_kib"], out["peak_rss_kib"])
            results[name]["peak_gpu_bytes"] = max(results[name]["peak_gpu_bytes"], out["peak_gpu_bytes"])
            print(
                f"  round {round_number + 1}: {name}: {' '.join(f'{t:.2f}' for t in out['times'])} s/batch", flush=True
            )
    return results


def _rates(
    results: dict[str, dict], dtypes: dict[str, str], peaks: dict[str, dict], flops: int, args: argparse.Namespace
) -> None:
    """Add each variant's images/s, TFLOP/s, share of the measured matmul peak and MFU to its result; print them."""
    print(
        f"  {'variant':<34}{'images/s':>10}{'s/image':>9}{'TFLOP/s':>9}{'of peak':>9}{'MFU':>7}{'peak RSS':>11}"
        f"  attention"
    )
    for name, result in results.items():
        seconds = statistics.median(result["times"])
        result.update(images_per_second=args.batch / seconds, tflops=flops / seconds / 1e12)
        result["peak_tflops"] = peaks[dtypes[name]]["tflops"]
        result["share_of_peak"] = result["tflops"] / result["peak_tflops"]  # of the matmul peak measured here
        peak = gpu_peak_tflops(dtypes[name]) if args.device == "cuda" else None
        result["mfu"] = result["tflops"] / peak if peak else None  # of the GPU's datasheet peak
        mfu = f"{result['mfu']:.0%}" if result["mfu"] is not None else "-"
        print(
            f"  {name:<34}{result['images_per_second']:10.4f}{seconds / args.batch:9.2f}{result['tflops']:9.3f}"
            f"{result['share_of_peak']:9.0%}{mfu:>7}{result['peak_rss_kib'] / 1024:7.0f} MiB  "
            f"{result['attention'] or '-'}"
        )


def _ratios(results: dict[str, dict]) -> dict[str, float]:
    """Images/s of each of ours over each reference's."""
    references = [name for name in results if name.startswith("reference")]
    return {
        f"{name} / {base}": result["images_per_second"] / results[base]["images_per_second"]
        for name, result in results.items()
        if name.startswith("ours")
        for base in references
    }


def benchmark_model(args: argparse.Namespace) -> None:
    """Ours at each dtype against the reference (as users run it, and with its allocator tuned), each in its own
    process, alternated round by round (A B C A B C) so that the machine's drift hits all of them alike."""
    variants = _variants(args)
    common = {
        "layers": args.layers,
        "batch": args.batch,
        "prompts": args.prompts,
        "device": args.device,
        "iters": args.iters,
        "attention": args.attention,
    }
    config = vit_large(args.layers)
    flops = model_flops(config, args.batch, args.prompts)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else None
    print(
        f"config: ViT-L width (hidden 1024, 16 heads), {args.layers} layers, 896x448, {args.batch} images x "
        f"{args.prompts} prompts per batch, device {args.device}{f' ({device_name})' if device_name else ''}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; each variant in its own process, {args.rounds} rounds "
        f"of {args.iters} batches; our predict: {flops / args.batch / 1e12:.3f} TFLOP per image"
    )
    results = _measure(variants, common, args.rounds)
    dtypes = {name: spec["dtype"] for name, (spec, _) in variants.items()}
    peaks = matmul_peaks(results, dtypes)
    for dtype, peak in peaks.items():
        shapes = ", ".join(f"{shape} {tflops:.3f}" for shape, tflops in peak["shapes"].items())
        print(
            f"  matmul peak {dtype}: {peak['tflops']:.3f} TFLOP/s, the best of (F.linear, TFLOP/s, median of "
            f"{peak['processes']} measuring processes): {shapes}"
        )
    _rates(results, dtypes, peaks, flops, args)
    ratios = _ratios(results)
    for label, ratio in ratios.items():
        print(f"  {label}: {ratio:.2f}x")
    write_record(
        args.json,
        {
            "benchmark": "model",
            "config": config,
            **common,
            "rounds": args.rounds,
            "flops_per_batch": flops,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "reference_images_per_second": results[f"reference {args.reference_dtype}"]["images_per_second"],
            "device_name": device_name,
            "matmul_peaks": peaks,
            "variants": results,
            "ratios": ratios,
        },
    )


def add_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `model` subcommand."""
    parser = sub.add_parser(
        "model", help="our SegGpt vs transformers, each in its own process, alternated", description=__doc__
    )
    parser.add_argument("--layers", type=int, default=24, help="transformer layers (ViT-L has 24)")
    parser.add_argument("--batch", type=int, default=1, help="images per batch")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per image (feature ensemble)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32"], help="ours at each")
    parser.add_argument("--reference-dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--attention",
        choices=["auto", "sdpa", "flex", "chunked"],
        default="auto",
        help="our attention backend (default: flex on CUDA; on the CPU chunked in bfloat16, else sdpa)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=2, help="timed batches per process, after one warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="processes per variant, alternated")
    return finish_parser(parser, benchmark_model)
