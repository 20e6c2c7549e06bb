"""Benchmarks whose output is reported, not asserted: `python -m jobs.benchmark
model|pipeline|scale|cpu-stages|plan|heldout|prompts|select|export`.

Each prints a short table and, as its last line, a JSON record (also written to `--json PATH`).

`model` times our `SegGpt.predict` against `transformers.SegGptForImageSegmentation` at the same config, batch and
prompts, each variant in its own process as a user runs it, alternated round by round so that the machine's drift
hits all of them: ours at each `--dtypes` (as the inference actor runs it: on the CPU with freed memory kept for
reuse, `model.memory`), the reference as it comes, and on the CPU the reference with glibc's malloc tuned the same
way by environment, so that nobody mistakes the allocator's gain for ours. Images/s, the ratios, TFLOP/s of our
predict's work (counted by torch) and, on a GPU, its share of the GPU's dense peak (MFU).

`pipeline` runs the whole job on a fresh local Ray over synthetic JPEGs and times the model alone on the same
batches before and after the job (each in a child process): end-to-end images/s, model-only images/s, their ratio,
and the peak memory of the driver and of every Ray process (sampled from /proc).

`scale` runs the whole job at N and 10 N images: time per image and the peak memory of every process at each size.

`cpu-stages` times preprocess (decode + resize, with and without `input.jpeg_draft`) and postprocess (upsample,
PNG, counts) per image on one core at several image sizes, and says how many cores keep one GPU busy.

`heldout` runs the whole labelling job with a checkpoint (default: the demo's bundled model) on held-out synthetic
tasks and scores it with `evaluate`.

`prompts` makes labelled synthetic pools (one task each, every class shown with probability `--presence`), runs
`select-prompts` on each and then `tune` from the best single prompt, and reports validation mean IoU: the chosen
set, the best single prompt and random sets; the tuned prompt (the checkpoint best on validation) before and after on
both parts of the pool.

`select` judges `select-prompts` outside itself: per held-out synthetic task it makes a small pool (default 20 images,
two classes, each shown with probability 0.5), writes its selection with the defaults, and labels held-out queries of
the same task through the whole job with the written set and with random K-sets of the pool, scored by `evaluate`.

`plan` times how a resumed run plans at scale, without Ray: it synthesises (once, reused by later runs) a local tree of
N empty `.jpg` inputs and an output whose `labels/` holds R rows as the job writes them (256-row files, error rows in
files of their own, a mask of B random bytes per ok row), then, in a fresh process, runs the planning steps of
`pipeline.labelling.job.autolabel` (listing, resume index, done keys, shard counts, work items) and reports the time of each,
the driver's peak and baseline RSS, and the bytes the resume index read as a share of `labels/`'s size.

`export` writes outputs of `--rows` rows of hand-drawn class maps and exports each to every format in a fresh
process: seconds and peak RSS, to show that memory stays flat as the output grows.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
from PIL import Image
from safetensors.torch import save_file

from model import SegGpt, SegGptConfig, hf_to_native, load_model
from model.checkpoint import DTYPES
from model.memory import KEEP_FREED_MEMORY_ENV
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


# Dense matrix-multiply peaks (TFLOP/s, no sparsity) of GPUs, by a word of their name, for MFU.
GPU_PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},  # SXM; the PCIe card is 756 / 51
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
    "L4": {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3},
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
    name = torch.cuda.get_device_name()
    return next((peaks[dtype] for word, peaks in GPU_PEAK_TFLOPS.items() if word in name), None)


def matmul_shapes(config: dict, batch: int, prompts: int) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of the multiplies that measure the matrix-multiply peak: 4096 x 1024 @ 1024 x 4096, and the model's
    own linear layers (qkv, proj, fc1, fc2) on the tokens of one half of the grid of every row."""
    model_config = SegGptConfig(**config)
    rows, cols = model_config.grid
    tokens, dim, hidden = batch * prompts * rows // 2 * cols, model_config.hidden_size, model_config.mlp_dim
    return {"4096x1024x4096": (4096, 1024, 4096), "qkv": (tokens, dim, 3 * dim), "proj": (tokens, dim, dim),
            "fc1": (tokens, dim, hidden), "fc2": (tokens, hidden, dim)}


def matmul_tflops(shapes: dict[str, tuple[int, int, int]], device: torch.device, dtype: torch.dtype,
                  min_seconds: float = 0.2) -> dict[str, float]:
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
                _sync(device)
                while calls < 2 or time.perf_counter() - start < min_seconds:
                    torch.nn.functional.linear(x, weight, bias)
                    calls += 1
                    if calls % 8 == 0:
                        _sync(device)
                _sync(device)
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
            _sync(device)
            start = time.perf_counter()
            run(*inputs)
            _sync(device)
            if i:
                times.append(time.perf_counter() - start)
    print(json.dumps({"times": times, "peak_rss_kib": _peak_kib(),
                      "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
                      "attention": attention, "matmul_tflops": matmul_tflops(matmul_shapes(config, batch, k), device,
                                                                             dtype)}))


def _run_model_child(spec: dict, tuned_malloc: bool) -> dict:
    """One measuring process; glibc's malloc as it comes, or tuned by environment (`KEEP_FREED_MEMORY_ENV`, as the
    inference actor runs)."""
    code = "import json, sys; from jobs.benchmark import _model_child; _model_child(json.loads(sys.argv[1]))"
    env = {name: value for name, value in os.environ.items() if name not in KEEP_FREED_MEMORY_ENV}
    env.update(KEEP_FREED_MEMORY_ENV if tuned_malloc else {})
    child = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=Path(__file__).resolve().parents[1],
                           capture_output=True, text=True, env=env)
    if child.returncode:
        sys.stderr.write(child.stderr)
        raise SystemExit(f"the measuring process of {spec['impl']} failed (exit {child.returncode})")
    return json.loads(child.stdout.strip().splitlines()[-1])


def benchmark_model(args: argparse.Namespace) -> None:
    """Ours at each dtype against the reference (as users run it, and with its allocator tuned), each in its own
    process, alternated round by round (A B C A B C) so that the machine's drift hits all of them alike."""
    on_cpu = args.device == "cpu"  # ours runs with the inference actor's allocator settings
    variants = {f"ours {dtype}": ({"impl": "ours", "dtype": dtype}, on_cpu) for dtype in args.dtypes}
    variants[f"reference {args.reference_dtype}"] = ({"impl": "reference", "dtype": args.reference_dtype}, False)
    if on_cpu:
        variants[f"reference {args.reference_dtype}, tuned malloc"] = (
            {"impl": "reference", "dtype": args.reference_dtype}, True)
    common = {"layers": args.layers, "batch": args.batch, "prompts": args.prompts, "device": args.device,
              "iters": args.iters, "attention": args.attention}
    config = vit_large(args.layers)
    flops = model_flops(config, args.batch, args.prompts)
    print(f"config: ViT-L width (hidden 1024, 16 heads), {args.layers} layers, 896x448, {args.batch} images x "
          f"{args.prompts} prompts per batch, device {args.device}"
          f"{f' ({torch.cuda.get_device_name()})' if args.device == 'cuda' else ''}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; each variant in its own process, {args.rounds} rounds of {args.iters} batches; "
          f"our predict: {flops / args.batch / 1e12:.3f} TFLOP per image")
    results: dict[str, dict] = {name: {"times": [], "peak_rss_kib": 0, "peak_gpu_bytes": 0, "matmul_tflops": []}
                                for name in variants}
    for round_number in range(args.rounds):
        for name, (spec, tuned_malloc) in variants.items():
            out = _run_model_child({**common, **spec}, tuned_malloc)
            results[name]["times"] += out["times"]
            results[name]["matmul_tflops"].append(out["matmul_tflops"])
            results[name]["attention"] = out["attention"]
            results[name]["peak_rss_kib"] = max(results[name]["peak_rss_kib"], out["peak_rss_kib"])
            results[name]["peak_gpu_bytes"] = max(results[name]["peak_gpu_bytes"], out["peak_gpu_bytes"])
            print(f"  round {round_number + 1}: {name}: {' '.join(f'{t:.2f}' for t in out['times'])} s/batch",
                  flush=True)
    dtypes = {name: spec["dtype"] for name, (spec, _) in variants.items()}
    peaks = matmul_peaks(results, dtypes)
    for dtype, peak in peaks.items():
        shapes = ", ".join(f"{shape} {tflops:.3f}" for shape, tflops in peak["shapes"].items())
        print(f"  matmul peak {dtype}: {peak['tflops']:.3f} TFLOP/s, the best of (F.linear, TFLOP/s, median of "
              f"{peak['processes']} measuring processes): {shapes}")
    print(f"  {'variant':<34}{'images/s':>10}{'s/image':>9}{'TFLOP/s':>9}{'of peak':>9}{'MFU':>7}{'peak RSS':>11}"
          f"  attention")
    for name, result in results.items():
        seconds = statistics.median(result["times"])
        result.update(images_per_second=args.batch / seconds, tflops=flops / seconds / 1e12)
        result["peak_tflops"] = peaks[dtypes[name]]["tflops"]
        result["share_of_peak"] = result["tflops"] / result["peak_tflops"]  # of the matmul peak measured here
        peak = gpu_peak_tflops(dtypes[name]) if args.device == "cuda" else None
        result["mfu"] = result["tflops"] / peak if peak else None  # of the GPU's datasheet peak
        mfu = f"{result['mfu']:.0%}" if result["mfu"] is not None else "-"
        print(f"  {name:<34}{result['images_per_second']:10.4f}{seconds / args.batch:9.2f}{result['tflops']:9.3f}"
              f"{result['share_of_peak']:9.0%}{mfu:>7}{result['peak_rss_kib'] / 1024:7.0f} MiB  {result['attention'] or '-'}")
    reference_rate = results[f"reference {args.reference_dtype}"]["images_per_second"]
    ratios = {}
    for name, result in results.items():
        if name.startswith("ours"):
            for base in (n for n in results if n.startswith("reference")):
                ratios[f"{name} / {base}"] = result["images_per_second"] / results[base]["images_per_second"]
    for label, ratio in ratios.items():
        print(f"  {label}: {ratio:.2f}x")
    record = {"benchmark": "model", "config": config, **common, "rounds": args.rounds, "flops_per_batch": flops,
              "torch": torch.__version__, "cpus": os.cpu_count(), "reference_images_per_second": reference_rate,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "matmul_peaks": peaks, "variants": results, "ratios": ratios}
    _write_record(args.json, record)


def _write_record(path: str | None, record: dict) -> None:
    """The benchmark's JSON record: to `path`, and as the last line printed."""
    text = json.dumps(record)
    if path:
        Path(path).write_text(text + "\n")
    print(text)


class ProcessPeaks:
    """Peak resident memory (KiB) of this process and of every process under it (a local Ray's GCS, raylet and
    workers), sampled from /proc every `interval_s` while in the `with` block: a process that ends between two
    samples loses at most its last interval's growth.

    `peaks` maps each pid to its peak (VmHWM), its largest private resident memory sampled (RssAnon) and the Ray
    task or actor names it ran (from its process title).
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.peaks: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessPeaks:
        _reset_peak()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_role(self, measure: str = "kib") -> dict[str, int]:
        """The largest peak of each kind of process: the driver, Ray's own, and each worker by what it ran.

        `measure` "kib": the resident peak (VmHWM), which counts the pages of Ray's shared object store that a
        process has touched; "private_kib": the largest private resident memory sampled (RssAnon).
        """
        roles: dict[str, int] = {}
        for peak in self.peaks.values():
            role = _role_of(peak)
            roles[role] = max(roles.get(role, 0), peak[measure])
        return dict(sorted(roles.items(), key=lambda item: -item[1]))

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds (user + system) used by each kind of process, summed over its processes."""
        roles: dict[str, float] = {}
        for peak in self.peaks.values():
            role = _role_of(peak)
            roles[role] = roles.get(role, 0.0) + peak["cpu_s"]
        return dict(sorted(roles.items(), key=lambda item: -item[1]))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        me = os.getpid()
        for pid in [me, *_descendants(me)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except (OSError, ValueError):
                continue  # ended meanwhile
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            kib = {name: int(fields.get(name, "0 kB").split()[0]) for name in ("VmHWM", "RssAnon")}
            peak = self.peaks.setdefault(pid, {"kib": 0, "private_kib": 0, "cpu_s": 0.0, "names": set()})
            peak["kib"] = max(peak["kib"], kib["VmHWM"])
            peak["cpu_s"] = max(peak["cpu_s"], _cpu_seconds(pid))
            peak["private_kib"] = max(peak["private_kib"], kib["RssAnon"])
            name = "driver" if pid == me else _process_role(title)
            if name:
                peak["names"].add(name)


def _role_of(peak: dict) -> str:
    """The kind of a sampled process: the Ray tasks and actors it ran, or an idle worker."""
    return " + ".join(sorted(peak["names"])) or "ray worker (idle)"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used so far (0 when it ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_role(title: str) -> str | None:
    """`ray::MapWorker(MapBatches(SegGptPredictor))` -> the same; `.../raylet ...` -> `raylet`; None when idle or
    not yet named."""
    if title.startswith("ray::"):
        name = title.split()[0]
        return None if name == "ray::IDLE" else name
    name = Path(title.split()[0]).name if title.strip() else ""
    return None if not name or name.startswith("python") else name  # a worker before it names itself


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _synthetic_job(root: Path, args: argparse.Namespace, images: int) -> dict:
    """A job config over `images` random 640x480 JPEGs under `root`, with a random ViT-L-width checkpoint and
    prompt set (made once per root)."""
    rng = np.random.default_rng(0)
    if not (root / "checkpoint").exists():
        for folder in ("checkpoint", "prompts"):
            (root / folder).mkdir(parents=True)
        config = vit_large(args.layers)
        torch.manual_seed(0)
        save_file(SegGpt(SegGptConfig(**config)).state_dict(), root / "checkpoint" / "model.safetensors")
        (root / "checkpoint" / "config.json").write_text(json.dumps(config))
        for i in range(args.prompts):
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(root / "prompts" / f"{i}.jpg")
            Image.fromarray(rng.integers(0, 3, (480, 640), dtype=np.uint8)).save(root / "prompts" / f"{i}.png")
    folder = root / f"images-{images}"
    folder.mkdir()
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return {
        "input": {"uri": str(folder), "jpeg_draft": args.jpeg_draft},
        "prompts": {"uri": str(root / "prompts"), "classes": ["a", "b"]},
        "model": {"checkpoint": str(root / "checkpoint"), "dtype": args.dtype},
        "output": {"uri": str(root / f"out-{images}"), "resume": False},
        "compute": {"batch_size": args.batch, "cpus_per_actor": args.cpus_per_actor,
                    "cpus_per_task": args.cpus_per_task},
    }


def _measured_job(job: dict) -> dict:
    """Run the job on a fresh local Ray; its summary and the peak memory of every process."""
    import ray

    from pipeline.labelling.job import autolabel

    ray.shutdown()
    with ProcessPeaks() as peaks:
        summary = autolabel(job, log=lambda line: None)
        ray.shutdown()  # inside: Ray's processes are sampled up to their end
    return {"images": summary.ok + summary.error, "ok": summary.ok, "seconds": summary.seconds,
            "images_per_second": summary.images_per_second, "peaks_kib": peaks.by_role(),
            "private_peaks_kib": peaks.by_role("private_kib"), "cpu_seconds": peaks.cpu_by_role()}


def _model_only_rate(checkpoint: str, args: argparse.Namespace, batches: int) -> float:
    """Images/s of `predict` alone on batches as the inference actor makes them, in this process, with the actor's
    threads and allocator."""
    from model.memory import keep_freed_memory

    if args.device == "cpu":
        torch.set_num_threads(max(1, int(args.cpus_per_actor)))  # as Ray gives the actor (OMP_NUM_THREADS)
        keep_freed_memory()
    model = load_model(checkpoint, dtype=args.dtype, device=args.device)
    model.set_attention("auto")
    k, dtype, device = args.prompts, DTYPES[args.dtype], torch.device(args.device)
    pixels = torch.randint(0, 256, (args.batch * k, 448, 448, 3), dtype=torch.uint8, device=device)
    prompts = [normalize(pixels, dtype) for _ in range(2)]
    times = []
    with torch.inference_mode():
        for _ in range(batches + 1):
            _sync(device)
            start = time.perf_counter()
            model.predict(normalize(pixels, dtype), *prompts, num_prompts=k, embedding_type="semantic")
            _sync(device)
            times.append(time.perf_counter() - start)
    return args.batch / statistics.median(times[1:])


def _print_peaks(peaks: dict[str, dict[str, int]]) -> None:
    """A table of peak memory by process kind, one column per run or measure."""
    runs = list(peaks)
    roles = list(dict.fromkeys(role for run in runs for role in peaks[run]))
    print(f"  {'peak RSS (MiB)':<58}" + "".join(f"{run:>12}" for run in runs))
    for role in roles:
        cells = "".join(f"{peaks[run][role] / 1024:12.0f}" if role in peaks[run] else f"{'-':>12}" for run in runs)
        print(f"  {role[:58]:<58}{cells}")


def _job_description(args: argparse.Namespace) -> str:
    return (f"ViT-L width, {args.layers} layers, 896x448, {args.prompts} prompts, batch {args.batch}, dtype "
            f"{args.dtype}, 640x480 JPEGs{' (draft decoding)' if args.jpeg_draft else ''}, device {args.device}, "
            f"cpus_per_actor {args.cpus_per_actor}, cpus_per_task {args.cpus_per_task}, {os.cpu_count()} CPUs")


def benchmark_pipeline(args: argparse.Namespace) -> None:
    """The whole job against the model alone, same run: the share of the job's time the model is busy.

    The model alone is timed before and after the job (in a child process each, as the actor runs it), so that
    the machine's drift over the job's minutes hits both sides; the ratio is against their mean.
    """
    batches = max(2, args.images // args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        job = _synthetic_job(Path(tmp), args, args.images)
        checkpoint = job["model"]["checkpoint"]
        before = _in_child(_model_only_rate, checkpoint, args, batches)
        run = _measured_job(job)
        after = _in_child(_model_only_rate, checkpoint, args, batches)
    model_rate = (before + after) / 2
    print(f"config: {_job_description(args)}, {args.images} images")
    print(f"      job: {run['images_per_second']:8.4f} images/s ({run['ok']} ok in {run['seconds']:.1f} s)")
    print(f"    model: {model_rate:8.4f} images/s (predict alone, same batches, as the actor runs it; "
          f"{before:.4f} before the job, {after:.4f} after)")
    print(f"     busy: {run['images_per_second'] / model_rate:.0%} of the model-only rate")
    _print_peaks({"peak RSS": run["peaks_kib"], "private": run["private_peaks_kib"]})
    print(f"  CPU seconds over the job's {run['seconds']:.1f} s (wall) on {os.cpu_count()} CPUs:")
    for role, seconds in run["cpu_seconds"].items():
        print(f"  {role[:58]:<58}{seconds:12.1f}")
    _write_record(args.json, {"benchmark": "pipeline", **vars(args), "job": run, "model_images_per_second": model_rate,
                              "model_before_after": [before, after], "ratio": run["images_per_second"] / model_rate})


def _in_child(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a fresh process (its threads and allocator settings stay there)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def benchmark_scale(args: argparse.Namespace) -> None:
    """The whole job at N and 10 N images: time per image and the peak memory of every process."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for images in (args.images, 10 * args.images):
            runs[images] = _measured_job(_synthetic_job(Path(tmp), args, images))
            print(f"  {images} images: {runs[images]['seconds']:.1f} s, "
                  f"{runs[images]['seconds'] / images:.2f} s/image", flush=True)
    small, large = runs[args.images], runs[10 * args.images]
    print(f"config: {_job_description(args)}")
    for images, run in runs.items():
        print(f"  {images:>6} images: {run['seconds'] / images:.3f} s/image ({run['images_per_second']:.3f} images/s)")
    growth = {}
    for measure, title in (("peaks_kib", "peak RSS"), ("private_peaks_kib", "peak private RSS (no object store)")):
        print(f"  {title}:")
        _print_peaks({f"{images} images": run[measure] for images, run in runs.items()})
        growth[measure] = {role: large[measure][role] / kib for role, kib in small[measure].items()
                           if role in large[measure] and kib}
        worst = max(growth[measure], key=growth[measure].get)
        print(f"  {title} 10N / N: largest growth {growth[measure][worst]:.2f}x ({worst}); driver "
              f"{growth[measure].get('driver', float('nan')):.2f}x; sum over processes "
              f"{sum(large[measure].values()) / sum(small[measure].values()):.2f}x")
    _write_record(args.json, {"benchmark": "scale", **vars(args), "runs": runs, "growth": growth})


def benchmark_cpu_stages(args: argparse.Namespace) -> None:
    """The CPU work around the model, per image on one core (this process, one thread): decode + resize
    (`preprocess`, with and without `input.jpeg_draft`) and upsample + PNG + counts (`postprocess`), at each
    `--sizes`; then the cores one GPU needs to be kept busy at `--gpu-images-per-second`."""
    from model.processing import build_palette
    from pipeline.labelling.postprocess import postprocess
    from pipeline.labelling.preprocess import preprocess

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    palette = build_palette(3)
    gpu_rate = args.gpu_images_per_second or (
        GPU_PEAK_TFLOPS["H100"]["bfloat16"] * 1e12 * args.mfu / model_flops(vit_large(24), 1, args.prompts))
    print(f"CPU stages per image on one core ({os.cpu_count()} CPUs here), {args.images} photo-like JPEGs per size "
          f"(quality 90); one GPU labelling {gpu_rate:.0f} images/s ({args.prompts} prompt(s))"
          + ("" if args.gpu_images_per_second else
             f": ViT-L bfloat16 at {args.mfu:.0%} of an H100's dense peak, an estimate until measured on one"))
    print(f"  {'size':<12}{'decode+resize':>15}{'draft':>9}{'post':>8}{'cores/GPU':>11}{'with draft':>12}")
    rows = {}
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        photo = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        buffer = tempfile.SpooledTemporaryFile()
        photo.save(buffer, format="JPEG", quality=90)
        buffer.seek(0)
        data = buffer.read()
        batch = {"key": np.array([f"{i}.jpg" for i in range(args.images)], object),
                 "source": np.array(["x"] * args.images, object), "bytes": np.array([data] * args.images, object),
                 "error": np.array([None] * args.images, object), "shard_images": np.zeros(args.images, np.int64)}
        timings = {}
        warm = preprocess({name: column[:1] for name, column in batch.items()}, size=(448, 448), exif_transpose=True)
        warm["class_map"], warm["score"] = np.zeros((1, 448, 448), np.uint8), np.ones(1, np.float32)
        postprocess(warm, palette=palette, model="m", prompt_set="p")  # first calls: lazy imports and set-up
        for draft in (False, True):
            start = time.perf_counter()
            pre = preprocess(dict(batch), size=(448, 448), exif_transpose=True, jpeg_draft=draft)
            timings["draft" if draft else "decode"] = (time.perf_counter() - start) / args.images
        pre.pop("pixels")
        blocks = rng.integers(0, 4, (args.images, 14, 14), dtype=np.uint8)  # regions, as a model paints them
        pre["class_map"] = blocks.repeat(32, axis=1).repeat(32, axis=2)
        pre["score"] = np.ones(args.images, np.float32)
        start = time.perf_counter()
        postprocess(pre, palette=palette, model="m", prompt_set="p")
        timings["post"] = (time.perf_counter() - start) / args.images
        timings["cores_per_gpu"] = gpu_rate * (timings["decode"] + timings["post"])
        timings["cores_per_gpu_draft"] = gpu_rate * (timings["draft"] + timings["post"])
        rows[size] = timings
        print(f"  {size:<12}{timings['decode'] * 1e3:12.1f} ms{timings['draft'] * 1e3:6.1f} ms"
              f"{timings['post'] * 1e3:5.1f} ms{timings['cores_per_gpu']:11.1f}{timings['cores_per_gpu_draft']:12.1f}")
    _write_record(args.json, {"benchmark": "cpu-stages", **vars(args), "gpu_images_per_second": gpu_rate,
                              "per_image_seconds": rows})


# --- plan: resume planning at scale -----------------------------------------------------------------

PLAN_MODEL = "bench-model-0123456789ab"  # the fingerprints of the synthetic labels, and of the planning run
PLAN_PROMPT_SET = "bench-prompts-0123456789"
PLAN_ROWS_PER_FILE = 256  # the job's default output.rows_per_file
PLAN_ERROR_EVERY = 100  # key i is an error row when i % 100 == 99: 1% of the keys
_MAX_FOLDERS = 1000
_SYNTH_THREADS = 8


class CountingFileSystem(LocalFileSystem):
    """A local filesystem whose opened files count the bytes they return (`bytes_read`, over all threads).

    Only reads through `open` are counted (read, read1, readinto, readinto1), not listings; pass it as the `fs`
    of `pipeline.labelling.plan.read_index` to see what the index reads from storage.
    """

    cachable = False  # a counter of its own per instance, never fsspec's shared LocalFileSystem

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.files_opened = 0

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if "r" not in mode or "+" in mode:
            return super()._open(path, mode, block_size=block_size, **kwargs)
        with self._lock:
            self.files_opened += 1
        return _CountingFile(self._strip_protocol(path), mode, fs=self, **kwargs)

    def count(self, size: int) -> None:
        with self._lock:
            self.bytes_read += size


class _CountingFile(LocalFileOpener):
    def read(self, *args, **kwargs):
        data = self.f.read(*args, **kwargs)
        self.fs.count(len(data))
        return data

    def read1(self, *args, **kwargs):
        data = self.f.read1(*args, **kwargs)
        self.fs.count(len(data))
        return data

    def readinto(self, buffer):
        size = self.f.readinto(buffer)
        self.fs.count(size or 0)
        return size

    def readinto1(self, buffer):
        size = self.f.readinto1(buffer)
        self.fs.count(size or 0)
        return size


def plan_key(i: int, inputs: int) -> str:
    """The key of input number `i` of `inputs`: `d<folder>/img<index in folder>.jpg`, in key order."""
    per_folder = math.ceil(inputs / min(_MAX_FOLDERS, inputs))
    return f"d{i // per_folder:04d}/img{i % per_folder:06d}.jpg"


def plan_error_indices(rows: int) -> np.ndarray:
    """The indices of the labelled keys that are error rows."""
    return np.arange(PLAN_ERROR_EVERY - 1, rows, PLAN_ERROR_EVERY)


def plan_expected_pending(inputs: int, rows: int) -> list[str]:
    """The keys a run over the synthetic data must still label: the error rows' and the unlabelled inputs'."""
    indices = [*plan_error_indices(min(inputs, rows)).tolist(), *range(min(inputs, rows), inputs)]
    return sorted(plan_key(i, inputs) for i in indices)


def synthesise_plan_data(directory: Path, inputs: int, rows: int, mask_bytes: int, log=print) -> dict:
    """`directory/inputs/` (empty .jpg files) and `directory/out/labels/` (rows as the job writes them).

    Each part is made once: a marker file (outside both trees) records what it holds, and a rerun with the same
    sizes reuses it. Returns the seconds spent on each part (0 when reused).
    """
    directory.mkdir(parents=True, exist_ok=True)
    made = {"inputs_s": 0.0, "labels_s": 0.0}
    want_inputs = {"inputs": inputs}
    if _marker(directory / "inputs.done.json") != want_inputs:
        start = time.perf_counter()
        _write_inputs(directory / "inputs", inputs)
        (directory / "inputs.done.json").write_text(json.dumps(want_inputs))
        made["inputs_s"] = time.perf_counter() - start
        log(f"synthesised {inputs} inputs in {made['inputs_s']:.1f} s")
    want_labels = {"inputs": inputs, "rows": rows, "mask_bytes": mask_bytes, "rows_per_file": PLAN_ROWS_PER_FILE}
    if _marker(directory / "labels.done.json") != want_labels:
        start = time.perf_counter()
        _write_labels(directory / "out", directory / "inputs", inputs, rows, mask_bytes)
        (directory / "labels.done.json").write_text(json.dumps(want_labels))
        made["labels_s"] = time.perf_counter() - start
        log(f"synthesised {rows} labelled rows in {made['labels_s']:.1f} s")
    return made


def _marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _write_inputs(folder: Path, inputs: int) -> None:
    marker = folder.parent / "inputs.done.json"
    marker.unlink(missing_ok=True)
    if folder.exists():
        shutil.rmtree(folder)
    folders = min(_MAX_FOLDERS, inputs)
    per_folder = math.ceil(inputs / folders)

    def make_folder(number: int) -> None:
        path = folder / f"d{number:04d}"
        path.mkdir(parents=True)
        for i in range(number * per_folder, min(inputs, (number + 1) * per_folder)):
            os.close(os.open(folder / plan_key(i, inputs), os.O_CREAT | os.O_WRONLY, 0o644))

    with ThreadPoolExecutor(_SYNTH_THREADS) as pool:
        list(pool.map(make_folder, range(folders)))


def _write_labels(out: Path, inputs_folder: Path, inputs: int, rows: int, mask_bytes: int) -> None:
    """`rows` rows in batches of 256 through the job's `LabelWriter` (png=False): ok rows to one file, error rows
    to one of their own. Each batch is built as Arrow arrays (no Python object per mask)."""
    from pipeline.labelling.write import LabelWriter

    (out.parent / "labels.done.json").unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    writer = LabelWriter(str(out), {}, png=False)
    source_prefix = f"file://{inputs_folder.resolve()}/"
    start_us = int(datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp() * 1e6)

    def write_batch(first: int) -> None:
        indices = np.arange(first, min(rows, first + PLAN_ROWS_PER_FILE))
        writer(_labels_batch(indices, inputs, mask_bytes, source_prefix, start_us))

    with ThreadPoolExecutor(_SYNTH_THREADS) as pool:
        list(pool.map(write_batch, range(0, rows, PLAN_ROWS_PER_FILE)))


def _labels_batch(indices: np.ndarray, inputs: int, mask_bytes: int, source_prefix: str, start_us: int) -> pa.Table:
    from pipeline.storage.output import LABELS_SCHEMA

    n = len(indices)
    error = indices % PLAN_ERROR_EVERY == PLAN_ERROR_EVERY - 1
    ok = ~error
    rng = np.random.default_rng(int(indices[0]))
    keys = pa.array([plan_key(int(i), inputs) for i in indices], pa.string())
    lengths = np.where(ok, mask_bytes, 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    validity = pa.py_buffer(np.packbits(ok, bitorder="little"))
    data = pa.py_buffer(rng.bytes(int(offsets[-1])))  # random: incompressible, as PNG bytes nearly are
    masks = pa.Array.from_buffers(pa.binary(), n, [validity, pa.py_buffer(offsets), data])
    classes = 3
    list_offsets = pa.array(np.arange(n + 1, dtype=np.int32) * classes)
    pixels = rng.integers(0, 448 * 448 // classes, n * classes)
    columns = {
        "key": keys,
        "source": pc.binary_join_element_wise(source_prefix, keys, ""),
        "status": pa.array(np.where(ok, "ok", "error").tolist(), pa.string()),
        "error": pa.array(np.where(ok, None, "OSError: synthetic read failure").tolist(), pa.string()),
        "width": pa.array(np.full(n, 640, np.int32), mask=error),
        "height": pa.array(np.full(n, 480, np.int32), mask=error),
        "mask": masks,
        "class_ids": pa.ListArray.from_arrays(list_offsets, pa.array(np.tile(np.arange(classes, dtype=np.int32), n)),
                                              mask=pa.array(error)),
        "pixel_counts": pa.ListArray.from_arrays(list_offsets, pa.array(pixels.astype(np.int64)), mask=pa.array(error)),
        "class_scores": pa.ListArray.from_arrays(list_offsets, pa.array(rng.random(n * classes)), mask=pa.array(error)),
        "score": pa.array(rng.random(n), mask=error),
        "model": pa.array([PLAN_MODEL] * n, pa.string()),
        "prompt_set": pa.array([PLAN_PROMPT_SET] * n, pa.string()),
        "labeled_at": pa.array(start_us + indices.astype(np.int64), pa.timestamp("us", tz="UTC")),
        "shard_images": pa.nulls(n, pa.int64()),
    }
    return pa.table({name: columns[name] for name in LABELS_SCHEMA.names if name != "mask_uri"})


def _status_kib(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def _rss_kib() -> int:
    """The process's resident set now (VmRSS, KiB)."""
    return _status_kib("VmRSS")


def _peak_kib() -> int:
    """The process's peak resident set over its life (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> bool:
    """Reset the peak resident set (VmHWM) to the current one (Linux: clear_refs 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _step_peak_kib(reset: bool) -> int:
    """The peak resident set since the last `_reset_peak` (VmHWM), or over the process's life when it failed."""
    return _status_kib("VmHWM") if reset else _peak_kib()


def _rchar() -> int:
    """Bytes this process has read through read-like system calls (/proc/self/io), listings excluded."""
    with open("/proc/self/io") as io_stats:
        for line in io_stats:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def plan_steps(inputs_uri: str, output_root: str, fs: CountingFileSystem) -> tuple[dict, pa.Table]:
    """The planning of `pipeline.labelling.job.autolabel` on a resume (on_mismatch refuse), step by step, in its order: listing
    (in `plan`), index, foreign labels (the refusal check), then `_pending_work`: done keys, skipped, work items.

    Returns the numbers of each step (seconds; RSS and peak RSS after it, KiB; Arrow's allocation after it) and
    the work items. Keeps what autolabel keeps alive (listing, index, done keys, work) until the end.
    """
    from pipeline.labelling import InputConfig
    from pipeline.storage.listing import list_inputs
    from pipeline.labelling.plan import done_keys, foreign_labels, pending_inputs, read_index, shard_images, shard_of

    steps: dict[str, dict] = {}
    pool = pa.default_memory_pool()

    def step(name, action):
        reset = _reset_peak()
        rchar, start = _rchar(), time.perf_counter()
        result = action()
        steps[name] = {
            "seconds": time.perf_counter() - start,
            "rss_kib": _rss_kib(),
            "peak_rss_kib": _step_peak_kib(reset),  # during this step alone, where the peak can be reset
            "arrow_bytes": pool.bytes_allocated(),
            "arrow_peak_bytes": pool.max_memory(),  # since the process started: a rise is this step's
            "rchar": _rchar() - rchar,
        }
        return result

    listing = step("list_inputs", lambda: list_inputs(InputConfig(uri=inputs_uri), {}))
    fs.bytes_read = 0
    before = step("read_index", lambda: read_index(fs, output_root))
    index = step("index_table", before.table)
    foreign = step("foreign_labels", lambda: foreign_labels(index, PLAN_MODEL, PLAN_PROMPT_SET))
    done = step("done_keys", lambda: done_keys(index, PLAN_MODEL, PLAN_PROMPT_SET))
    listed = listing["key"]
    skipped = step(
        "skipped", lambda: pc.sum(pc.or_(pc.is_in(done, listed), pc.is_in(shard_of(done), listed))).as_py() or 0
    )
    images = step("shard_images", lambda: shard_images(index))
    work = step("pending_inputs", lambda: pending_inputs(listing, done, images))
    numbers = {
        "steps": steps,
        "total_seconds": sum(s["seconds"] for s in steps.values()),
        "planning_peak_rss_kib": max(s["peak_rss_kib"] for s in steps.values()),
        "listed": listing.num_rows,
        "index_rows": index.num_rows,
        "index_files": len(before.files),
        "index_bytes_read": fs.bytes_read,
        "index_files_opened": fs.files_opened,
        "index_rchar": steps["read_index"]["rchar"],
        "foreign_groups": len(foreign),
        "done": len(done),
        "skipped": skipped,
        "pending": work.num_rows,
        "arrow_peak_bytes": pool.max_memory(),
        "arrow_pool": pool.backend_name,
    }
    return numbers, work


def _plan_child(inputs_uri: str, output_root: str) -> None:
    """Body of the measuring process: import what the job's driver imports, then plan and print JSON."""
    import pipeline.labelling.job  # noqa: F401  (torch, Ray, pyarrow, fsspec: the driver's baseline)

    baseline = {"rss_kib": _rss_kib(), "import_peak_rss_kib": _peak_kib()}
    numbers, _ = plan_steps(inputs_uri, output_root, CountingFileSystem())
    numbers["baseline"] = baseline
    numbers["peak_rss_kib"] = _peak_kib()  # ru_maxrss over the process's life: the imports' peak included
    numbers["end_rss_kib"] = _rss_kib()
    print(json.dumps(numbers))


def _labels_size(labels: Path) -> tuple[int, int]:
    sizes = [entry.stat().st_size for entry in os.scandir(labels) if entry.name.endswith(".parquet")]
    return len(sizes), sum(sizes)


def _evict(labels: Path) -> None:
    """Drop the labels files from the page cache (posix_fadvise DONTNEED), so that the index reads them cold."""
    for entry in os.scandir(labels):
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def benchmark_plan(args: argparse.Namespace) -> None:
    directory = Path(args.dir).resolve()
    made = synthesise_plan_data(directory, args.inputs, args.rows, args.mask_bytes)
    labels = directory / "out" / "labels"
    files, labels_bytes = _labels_size(labels)
    if args.cold:
        _evict(labels)
    code = "import sys; from jobs.benchmark import _plan_child; _plan_child(sys.argv[1], sys.argv[2])"
    child = subprocess.run(
        [sys.executable, "-c", code, str(directory / "inputs"), str(directory / "out")],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
    )
    if child.returncode:
        sys.stderr.write(child.stderr)
        raise SystemExit(f"the measuring process failed (exit {child.returncode})")
    numbers = json.loads(child.stdout.strip().splitlines()[-1])
    steps, base = numbers["steps"], numbers["baseline"]
    mib = 1024
    index_s = steps["read_index"]["seconds"] + steps["index_table"]["seconds"]
    share = numbers["index_bytes_read"] / labels_bytes if labels_bytes else 0.0
    expected = len(plan_expected_pending(args.inputs, args.rows))
    print(
        f"plan: {args.inputs} inputs (local tree, {min(_MAX_FOLDERS, args.inputs)} folders), {args.rows} labelled rows "
        f"in {files} files of <= {PLAN_ROWS_PER_FILE} rows ({args.mask_bytes} mask bytes per ok row), "
        f"{'cold' if args.cold else 'warm'} page cache, {os.cpu_count()} CPUs; data in {directory}"
        + (f" (synthesised: inputs {made['inputs_s']:.0f} s, labels {made['labels_s']:.0f} s)" if any(made.values())
           else " (reused)")
    )
    print(f"  {'step':<16}{'seconds':>9}{'RSS after':>12}{'step peak':>12}{'Arrow after':>13}{'Arrow peak':>12}")
    for name, s in steps.items():
        print(f"  {name:<16}{s['seconds']:9.2f}{s['rss_kib'] / mib:8.0f} MiB{s['peak_rss_kib'] / mib:8.0f} MiB"
              f"{s['arrow_bytes'] / 2**20:9.0f} MiB{s['arrow_peak_bytes'] / 2**20:8.0f} MiB")
    print(f"  {'total':<16}{numbers['total_seconds']:9.2f}")
    peak = numbers["planning_peak_rss_kib"]
    print(f"  driver RSS: baseline {base['rss_kib'] / mib:.0f} MiB after imports (pipeline.labelling.job: torch, Ray), peak "
          f"while planning {peak / mib:.0f} MiB (VmHWM), so planning added {(peak - base['rss_kib']) / mib:.0f} MiB; "
          f"ru_maxrss {numbers['peak_rss_kib'] / mib:.0f} MiB at the end (reset with VmHWM before each step; "
          f"{base['import_peak_rss_kib'] / mib:.0f} MiB after the imports); Arrow's peak allocation "
          f"{numbers['arrow_peak_bytes'] / 2**20:.0f} MiB ({numbers['arrow_pool']})")
    print(f"  resume index: {numbers['index_rows']} rows of {numbers['index_files']} files in {index_s:.2f} s "
          f"({numbers['index_rows'] / index_s if index_s else 0:,.0f} rows/s); read {numbers['index_bytes_read']:,} "
          f"bytes (counting filesystem; rchar {numbers['index_rchar']:,}) of labels/'s {labels_bytes:,}: {share:.2%}")
    print(f"  listed {numbers['listed']} inputs; done {numbers['done']}, skipped {numbers['skipped']}, "
          f"pending work items {numbers['pending']} (expected {expected})")
    print(json.dumps({
        "inputs": args.inputs, "rows": args.rows, "mask_bytes": args.mask_bytes, "cold": args.cold,
        "labels_files": files, "labels_bytes": labels_bytes, "index_share": share, "expected_pending": expected,
        "synthesis_seconds": made, **numbers,
    }))


def benchmark_heldout(args: argparse.Namespace) -> None:
    """The whole labelling job with a checkpoint on held-out synthetic tasks (seeds training never draws), scored
    by `evaluate` against their ground truth: mean IoU per task and over all tasks."""
    import ray

    from jobs.demo.build import write_sample
    from pipeline.results.evaluate import evaluate
    from pipeline.labelling.job import autolabel

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    scores = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.first_seed, args.first_seed + args.tasks):
            root = Path(folder) / f"task{seed}"
            classes = write_sample(root, seed, images=args.images)
            config = {"input": {"uri": str(root / "images")},
                      "prompts": {"uri": str(root / "prompts"), "classes": classes},
                      "model": {"checkpoint": args.checkpoint}, "output": {"uri": str(root / "out")},
                      "compute": {"batch_size": 4}}
            autolabel(config, log=lambda line: None)
            result = evaluate(str(root / "out"), str(root / "truth"))
            scores.append(result.mean_iou)
            print(f"task seed {seed} ({', '.join(classes)}): mean IoU {result.mean_iou:.3f}, "
                  f"pixel accuracy {result.pixel_accuracy:.3f}")
    print(f"held-out mean IoU over {args.tasks} tasks of {args.images} images: {np.mean(scores):.3f} "
          f"(min {np.min(scores):.3f}, max {np.max(scores):.3f}); checkpoint {args.checkpoint}")


def benchmark_prompts(args: argparse.Namespace) -> None:
    """select-prompts and tune on held-out synthetic pools: validation mean IoU of each choice."""
    import ray

    from pipeline.prompts.select import select_prompts
    from pipeline.training.synthetic import random_task, render
    from pipeline.prompts.tune import tune

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.first_seed, args.first_seed + args.pools):
            pool = Path(folder) / f"pool{seed}"
            pool.mkdir()
            rng = np.random.default_rng(seed)
            task = random_task(rng, args.classes)
            for i in range(args.images):
                image, labels = render(task, rng, (64, 64), presence=args.presence)
                Image.fromarray(image).save(pool / f"img{i:04d}.png")
                Image.fromarray(labels).save(pool / f"img{i:04d}.mask.png")
            classes = tuple(f"class{c}" for c in range(1, args.classes + 1))
            chosen = select_prompts(str(pool), checkpoint=args.checkpoint, classes=classes, k=args.k,
                                    to=str(Path(folder) / f"chosen{seed}"), candidates=args.candidates, seed=seed,
                                    val_fraction=args.val_fraction, log=lambda line: None)
            start = chosen.best_single["key"].removesuffix(".png")
            tuned = tune({"model": {"checkpoint": args.checkpoint},
                          "prompt": {"uri": str(pool), "name": start, "classes": list(classes)},
                          "data": {"uri": str(pool), "val_fraction": args.val_fraction, "seed": seed},
                          "train": {"steps": args.steps, "lr": args.lr, "log_every": 50, "checkpoint_every": 100},
                          "output": {"uri": str(Path(folder) / f"tuned{seed}")},
                          "compute": {"cpus_per_worker": os.cpu_count()}}, log=lambda line: None)
            record = {"seed": seed, "chosen": chosen.steps[chosen.kept["step"] - 1]["mean_iou"],
                      "best_single": chosen.best_single["mean_iou"], "random": chosen.random["mean_iou"],
                      "tuned_step": tuned.chosen_step,
                      **{f"tuned_{part}_{when}": value for part, scores in tuned.scores.items()
                         for when, value in scores.items()}}
            records.append(record)
            print(f"pool seed {seed}: chosen {args.k}-set {record['chosen']:.3f}, best single "
                  f"{record['best_single']:.3f}, random {args.k}-sets {record['random']:.3f}; tuned from the best "
                  f"single: training "
                  f"{record['tuned_training_before']:.3f} -> {record['tuned_training_after']:.3f}, validation "
                  f"{record['tuned_validation_before']:.3f} -> {record['tuned_validation_after']:.3f} (the prompt of "
                  f"step {tuned.chosen_step})", flush=True)
    means = {key: float(np.mean([r[key] for r in records])) for key in records[0] if key not in ("seed", "tuned_step")}
    print("mean over pools: " + ", ".join(f"{key} {value:.3f}" for key, value in means.items()))
    print(json.dumps({"what": "prompts", "args": vars(args), "pools": records, "mean": means}))


def benchmark_select(args: argparse.Namespace) -> None:
    """select-prompts judged outside itself: per held-out synthetic task, a pool, `--queries` other images of the task
    through the whole job with the written set and with random K-sets of the pool, all scored by `evaluate`."""
    import ray

    from pipeline.results.evaluate import evaluate
    from pipeline.labelling.job import autolabel
    from pipeline.prompts.select import select_prompts
    from pipeline.training.synthetic import random_task, render

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    classes = [f"class{c}" for c in range(1, args.classes + 1)]

    def write(folder: Path, pictures: list, masks_to: Path | None = None) -> None:
        folder.mkdir(parents=True)
        for i, (image, labels) in enumerate(pictures):
            Image.fromarray(image).save(folder / f"img{i:04d}.png")
            Image.fromarray(labels).save((masks_to or folder) / f"img{i:04d}{'.png' if masks_to else '.mask.png'}")

    def job_score(root: Path, prompts: Path, name: str) -> float:
        autolabel({"input": {"uri": str(root / "queries")}, "prompts": {"uri": str(prompts), "classes": classes},
                   "model": {"checkpoint": args.checkpoint}, "output": {"uri": str(root / f"out-{name}")},
                   "compute": {"batch_size": 4}}, log=lambda line: None)
        return evaluate(str(root / f"out-{name}"), str(root / "truth")).mean_iou

    records = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.first_seed, args.first_seed + args.tasks):
            root = Path(folder) / f"task{seed}"
            rng = np.random.default_rng(seed)
            task = random_task(rng, args.classes)
            write(root / "pool", [render(task, rng, (64, 64), presence=args.presence) for _ in range(args.images)])
            (root / "truth").mkdir(parents=True)
            write(root / "queries", [render(task, rng, (64, 64)) for _ in range(args.queries)], root / "truth")
            chosen = select_prompts(str(root / "pool"), checkpoint=args.checkpoint, classes=tuple(classes), k=args.k,
                                    to=str(root / "chosen"), seed=seed, log=lambda line: None)
            randoms = []
            for draw in range(args.random_draws):
                prompts = root / f"random{draw}"
                prompts.mkdir()
                for i in sorted(rng.choice(args.images, args.k, replace=False).tolist()):
                    for suffix in (".png", ".mask.png"):
                        shutil.copy(root / "pool" / f"img{i:04d}{suffix}", prompts / f"img{i:04d}{suffix}")
                randoms.append(job_score(root, prompts, f"random{draw}"))
            record = {"seed": seed, "kept_prompts": len(chosen.names), "validation_images": chosen.counts["validation"],
                      "validation_score": chosen.steps[chosen.kept["step"] - 1]["mean_iou"],
                      "written": job_score(root, root / "chosen", "chosen"), "random_mean": float(np.mean(randoms)),
                      "random": randoms}
            records.append(record)
            print(f"task seed {seed}: written set ({record['kept_prompts']} prompts, validation "
                  f"{record['validation_score']:.3f} on {record['validation_images']} images) {record['written']:.3f} "
                  f"on {args.queries} held-out queries; random {args.k}-sets {record['random_mean']:.3f} "
                  f"({', '.join(f'{r:.3f}' for r in randoms)})", flush=True)
    written, random = (float(np.mean([r[key] for r in records])) for key in ("written", "random_mean"))
    wins = sum(r["written"] >= r["random_mean"] for r in records)
    print(f"over {args.tasks} tasks: written set {written:.3f}, random {args.k}-sets {random:.3f}; the written set "
          f"at least the random mean in {wins} of {args.tasks}")
    _write_record(args.json, {"what": "select", "args": vars(args), "tasks": records,
                              "mean": {"written": written, "random": random}})


def _export_output(folder: Path, rows: int, side: int) -> str:
    """A job output of `rows` ok rows, each a `side`-square class map of four random rectangles and discs."""
    from model.processing import build_palette, encode_png
    from pipeline.labelling.write import LabelWriter
    from pipeline.storage.output import write_job_files

    uri = str(folder / f"out-{rows}")
    writer, palette = LabelWriter(uri, {}, png=False), build_palette(2)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    for start in range(0, rows, 256):
        batch = []
        for i in range(start, min(rows, start + 256)):
            labels = np.zeros((side, side), np.uint8)
            for class_id in (1, 1, 2, 2):
                y, x, r = rng.integers(0, side, 2).tolist() + [int(rng.integers(4, side // 6))]
                if class_id == 1:
                    labels[y : y + r, x : x + 2 * r] = 1
                else:
                    labels[np.hypot(yy - y, xx - x) <= r] = 2
            counts = np.bincount(labels.ravel(), minlength=3)
            batch.append({"key": f"{i // 1000:03d}/{i:07d}.jpg", "source": f"s3://in/{i:07d}.jpg", "status": "ok",
                          "error": None, "width": side, "height": side, "mask": encode_png(labels, palette),
                          "class_ids": np.flatnonzero(counts).tolist(), "pixel_counts": counts[counts > 0].tolist(),
                          "class_scores": [0.5] * int((counts > 0).sum()), "score": 0.5, "model": "m",
                          "prompt_set": "p", "labeled_at": datetime.now(timezone.utc), "shard_images": None})
        writer(pa.Table.from_pylist(batch))
    write_job_files(uri, {}, {"classes": ["background", "bar", "disc"]}, success=True)
    return uri


def _measured_export(uri: str, fmt: str, to: str) -> dict:
    """Export in this (child) process: seconds and peak RSS."""
    from pipeline.results.export import export

    start = time.perf_counter()
    summary = export(uri, fmt, to=to, log=lambda line: None)
    return {"seconds": time.perf_counter() - start, "peak_mib": _peak_kib() / 1024, "regions": summary.regions}


def benchmark_export(args: argparse.Namespace) -> None:
    """`export` at each --rows: time and peak memory of the exporting process, per format."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            uri = _export_output(Path(tmp), rows, args.side)
            for fmt in args.formats:
                results[f"{fmt} {rows}"] = _in_child(_measured_export, uri, fmt, f"{tmp}/export-{fmt}-{rows}")
    print(f"{'format, rows':<22}{'seconds':>10}{'peak RSS (MiB)':>16}{'regions':>10}")
    for name, result in results.items():
        print(f"{name:<22}{result['seconds']:>10.1f}{result['peak_mib']:>16.0f}{result['regions']:>10}")
    _write_record(args.json, {"benchmark": "export", **vars(args), "results": results})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    model = sub.add_parser("model", help="our SegGpt vs transformers, each in its own process, alternated")
    model.add_argument("--layers", type=int, default=24, help="transformer layers (ViT-L has 24)")
    model.add_argument("--batch", type=int, default=1, help="images per batch")
    model.add_argument("--prompts", type=int, default=1, help="prompts per image (feature ensemble)")
    model.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32"], help="ours at each")
    model.add_argument("--reference-dtype", choices=sorted(DTYPES), default="float32")
    model.add_argument("--attention", choices=["auto", "sdpa", "flex"], default="auto",
                       help="our attention backend (default: flex on CUDA, sdpa on the CPU)")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    model.add_argument("--iters", type=int, default=2, help="timed batches per process, after one warm-up")
    model.add_argument("--rounds", type=int, default=2, help="processes per variant, alternated")
    model.add_argument("--json", help="write the JSON record here too")
    job = sub.add_parser("pipeline", help="the whole job on local Ray vs the model alone")
    scale = sub.add_parser("scale", help="the whole job at N and 10 N images: time per image, peak memory")
    for parser_ in (job, scale):
        parser_.add_argument("--layers", type=int, default=2, help="transformer layers (ViT-L has 24)")
        parser_.add_argument("--images", type=int, default=16, help="images (N for scale)")
        parser_.add_argument("--batch", type=int, default=4, help="images per model batch")
        parser_.add_argument("--prompts", type=int, default=1, help="prompts in the set")
        parser_.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
        parser_.add_argument("--cpus-per-actor", type=float, default=1.0)
        parser_.add_argument("--cpus-per-task", type=float, default=1.0)
        parser_.add_argument("--jpeg-draft", action="store_true", help="input.jpeg_draft")
        parser_.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        parser_.add_argument("--json", help="write the JSON record here too")
    stages = sub.add_parser("cpu-stages", help="preprocess and postprocess per image on one core; cores per GPU")
    stages.add_argument("--sizes", nargs="+", default=["640x480", "1920x1080", "4000x3000"], help="WIDTHxHEIGHT")
    stages.add_argument("--images", type=int, default=8, help="images per size")
    stages.add_argument("--prompts", type=int, default=1, help="prompts per image (the GPU's work per image)")
    stages.add_argument("--gpu-images-per-second", type=float, help="a measured GPU rate (default: estimated)")
    stages.add_argument("--mfu", type=float, default=0.5, help="the estimate's share of the GPU's peak")
    stages.add_argument("--json", help="write the JSON record here too")
    planning = sub.add_parser("plan", help="resume planning over synthetic inputs and labels: time, memory, bytes read")
    planning.add_argument("--inputs", type=int, default=1_000_000, help="input files to list")
    planning.add_argument("--rows", type=int, default=1_000_000, help="rows in labels/ (the first keys, 1%% errors)")
    planning.add_argument("--mask-bytes", type=int, default=4000, help="mask bytes per ok row (a small PNG)")
    planning.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "seggpt-plan-bench"),
                          help="where the synthetic data is made, or reused when it is there")
    planning.add_argument("--cold", action="store_true", help="drop labels/ from the page cache before measuring")
    heldout = sub.add_parser("heldout", help="a checkpoint through the whole job on held-out synthetic tasks: mIoU")
    heldout.add_argument("--checkpoint", default=str(Path(__file__).parent / "demo" / "checkpoint"))
    heldout.add_argument("--tasks", type=int, default=10)
    heldout.add_argument("--images", type=int, default=8)
    heldout.add_argument("--first-seed", type=int, default=1000)
    prompts = sub.add_parser("prompts", help="select-prompts and tune on held-out synthetic pools: validation mIoU")
    prompts.add_argument("--checkpoint", default=str(Path(__file__).parent / "demo" / "checkpoint"))
    prompts.add_argument("--pools", type=int, default=3)
    prompts.add_argument("--images", type=int, default=120, help="images per pool")
    prompts.add_argument("--classes", type=int, default=3)
    prompts.add_argument("--presence", type=float, default=0.4, help="the chance that an image shows a class")
    prompts.add_argument("--k", type=int, default=3)
    prompts.add_argument("--candidates", type=int, default=16)
    prompts.add_argument("--val-fraction", type=float, default=0.3)
    prompts.add_argument("--steps", type=int, default=200, help="tuning steps of 8 images")
    prompts.add_argument("--lr", type=float, default=0.01)
    prompts.add_argument("--first-seed", type=int, default=2000)
    selecting = sub.add_parser("select", help="select-prompts' written set vs random K-sets, through the whole job")
    selecting.add_argument("--checkpoint", default=str(Path(__file__).parent / "demo" / "checkpoint"))
    selecting.add_argument("--tasks", type=int, default=5)
    selecting.add_argument("--images", type=int, default=20, help="images per pool")
    selecting.add_argument("--queries", type=int, default=8, help="held-out images per task, labelled by the job")
    selecting.add_argument("--classes", type=int, default=2)
    selecting.add_argument("--presence", type=float, default=0.5, help="the chance that a pool image shows a class")
    selecting.add_argument("--k", type=int, default=3)
    selecting.add_argument("--random-draws", type=int, default=5)
    selecting.add_argument("--first-seed", type=int, default=3000)
    selecting.add_argument("--json", help="write the JSON record here too")
    exporting = sub.add_parser("export", help="export at several sizes: time and peak memory per format")
    exporting.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    exporting.add_argument("--side", type=int, default=256, help="class maps of side x side pixels")
    exporting.add_argument("--formats", nargs="+", default=["coco", "yolo-seg", "masks"])
    exporting.add_argument("--json", help="write the JSON record here too")
    args = parser.parse_args(argv)
    {"model": benchmark_model, "pipeline": benchmark_pipeline, "scale": benchmark_scale,
     "cpu-stages": benchmark_cpu_stages, "plan": benchmark_plan,
     "heldout": benchmark_heldout, "prompts": benchmark_prompts, "select": benchmark_select,
     "export": benchmark_export}[args.what](args)


if __name__ == "__main__":
    main()
