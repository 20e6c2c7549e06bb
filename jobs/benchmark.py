"""Benchmarks whose output is reported, not asserted: `python -m jobs.benchmark model|pipeline [options]`.

`model` times our `SegGpt.predict` against `transformers.SegGptForImageSegmentation` in one process, with
the same random weights, config, dtype and batch, alternating the two so that machine noise hits both.

`pipeline` runs the whole job on local Ray over synthetic JPEGs and times the model alone on the same batches in
the same run: the job's images/s over the model's is the share of time the model is busy (one actor).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from model import SegGpt, SegGptConfig, hf_to_native, load_model
from model.checkpoint import DTYPES
from model.processing import normalize


def vit_large(layers: int) -> dict:
    """ViT-L's width and resolution with fewer layers; merge and feature layers kept within them."""
    return dict(
        hidden_size=1024,
        num_attention_heads=16,
        num_hidden_layers=layers,
        image_size=[896, 448],
        merge_index=min(2, layers - 1),
        intermediate_hidden_state_indices=sorted({min(i, layers - 1) for i in (5, 11, 17, 23)} | {layers - 1}),
    )


def benchmark_model(args: argparse.Namespace) -> None:
    import transformers  # the reference: a test dependency, needed only here

    layers = args.layers
    config = vit_large(layers)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    reference = transformers.SegGptForImageSegmentation(transformers.SegGptConfig(**config)).eval()
    ours = SegGpt(SegGptConfig.from_dict(reference.config.to_dict())).eval()
    ours.load_state_dict(hf_to_native(reference.state_dict()))
    reference.to(device, dtype)
    ours.to(device, dtype)

    rows = args.batch * args.prompts
    inputs = [torch.randn(rows, 3, 448, 448, device=device, dtype=dtype) for _ in range(3)]
    inputs[0] = inputs[0][:: args.prompts].repeat_interleave(args.prompts, dim=0)  # one image per group

    def run_reference() -> torch.Tensor:
        out = reference(*inputs, feature_ensemble=args.prompts > 1).pred_masks
        return out[:: args.prompts, :, 448:]

    def run_ours() -> torch.Tensor:
        return ours.predict(*inputs, num_prompts=args.prompts)

    print(
        f"config: ViT-L width (hidden 1024, 16 heads), {layers} layers, 896x448, dtype {args.dtype}, "
        f"device {device}, {args.batch} images x {args.prompts} prompts, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    with torch.no_grad():
        difference = (run_ours().float() - run_reference().float()).abs().max().item()  # also the warm-up
        times: dict[str, list[float]] = {"reference": [], "ours": []}
        for _ in range(args.iters):
            for name, run in (("reference", run_reference), ("ours", run_ours)):
                _sync(device)
                start = time.perf_counter()
                run()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    rates = {name: args.batch / statistics.median(t) for name, t in times.items()}
    for name, rate in rates.items():
        print(f"{name:>9}: {rate:8.3f} images/s (median of {args.iters}, {statistics.median(times[name]):.3f} s/batch)")
    print(f"    ratio: {rates['ours'] / rates['reference']:.2f}x (ours / reference)")
    print(f" max|diff| of the input half: {difference:.2e}" + ("" if args.prompts == 1 else
          " (K > 1: the reference ensembles differently at the merge layer, see README)"))


def benchmark_pipeline(args: argparse.Namespace) -> None:
    from pipeline.job import autolabel

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for folder in ("checkpoint", "prompts", "images"):
            (root / folder).mkdir()
        config = vit_large(args.layers)
        torch.manual_seed(0)
        save_file(SegGpt(SegGptConfig(**config)).state_dict(), root / "checkpoint" / "model.safetensors")
        (root / "checkpoint" / "config.json").write_text(json.dumps(config))
        for i in range(args.prompts):
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(root / "prompts" / f"{i}.jpg")
            Image.fromarray(rng.integers(0, 3, (480, 640), dtype=np.uint8)).save(root / "prompts" / f"{i}.png")
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        job = {
            "input": {"uri": str(root / "images")},
            "prompts": {"uri": str(root / "prompts"), "classes": ["a", "b"]},
            "model": {"checkpoint": str(root / "checkpoint"), "dtype": args.dtype},
            "output": {"uri": str(root / "out"), "resume": False},
            "compute": {"batch_size": args.batch, "cpus_per_actor": args.cpus_per_actor},
        }
        summary = autolabel(job, log=lambda line: None)

        if args.device == "cpu":
            torch.set_num_threads(max(1, int(args.cpus_per_actor)))  # as Ray gives the actor (OMP_NUM_THREADS)
        model = load_model(str(root / "checkpoint"), dtype=args.dtype, device=args.device)
        k, dtype = args.prompts, DTYPES[args.dtype]
        pixels = torch.randint(0, 256, (args.batch * k, 448, 448, 3), dtype=torch.uint8, device=args.device)
        prompts = [normalize(pixels, dtype) for _ in range(2)]
        times = []
        for _ in range(max(2, args.images // args.batch)):
            _sync(torch.device(args.device))
            start = time.perf_counter()
            model.predict(normalize(pixels, dtype), *prompts, num_prompts=k, embedding_type="semantic")
            _sync(torch.device(args.device))
            times.append(time.perf_counter() - start)
    model_rate = args.batch / statistics.median(times[1:])
    print(
        f"config: ViT-L width, {args.layers} layers, 896x448, {args.prompts} prompts, batch {args.batch}, "
        f"dtype {args.dtype}, {args.images} JPEGs of 640x480, device {args.device}"
    )
    print(f"      job: {summary.images_per_second:8.3f} images/s ({summary})")
    print(f"    model: {model_rate:8.3f} images/s (predict alone, same batch)")
    print(f"     busy: {summary.images_per_second / model_rate:.0%} of the job's time the model is computing")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    model = sub.add_parser("model", help="our SegGpt vs transformers, same weights and inputs")
    model.add_argument("--layers", type=int, default=4, help="transformer layers (ViT-L has 24)")
    model.add_argument("--batch", type=int, default=2, help="images per batch")
    model.add_argument("--prompts", type=int, default=1, help="prompts per image (feature ensemble)")
    model.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    model.add_argument("--iters", type=int, default=3)
    job = sub.add_parser("pipeline", help="the whole job on local Ray vs the model alone")
    job.add_argument("--layers", type=int, default=2, help="transformer layers (ViT-L has 24)")
    job.add_argument("--images", type=int, default=32)
    job.add_argument("--batch", type=int, default=4, help="images per model batch")
    job.add_argument("--prompts", type=int, default=1, help="prompts in the set")
    job.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    job.add_argument("--cpus-per-actor", type=float, default=1.0)
    job.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.what == "model":
        benchmark_model(args)
    else:
        benchmark_pipeline(args)


if __name__ == "__main__":
    main()
