"""`select-prompts`: choose up to K prompts from a labelled pool, greedily, by the ensemble's validation mean IoU.

The pool (any layout `pipeline.storage.pairs` reads) is split by key (`pipeline.prompts.scoring.validation_bound`:
by default 30% is held out, at most about 300 images, exactly that share of the keys). The candidates are
`candidates` usable images of the training part drawn at random, plus for each class the draw lacks the first image
that shows it. Each step scores every candidate added to the set chosen so far, as one feature-ensembled prompt set,
on the whole validation part (one pass of the scoring actors over its blocks per step), and takes the one with the
highest mean IoU among those after which the remaining steps can still cover every class. Every step's score comes
with a 95% bootstrap interval over the validation images.

K is the most prompts: the set written is the best step's, or a step with fewer prompts that is not measurably worse
(the 95% paired-bootstrap interval of the best step's advantage over it reaches 0). The report says which step it
kept and why, warns when the validation part is too small to tell sets apart, and compares each step with the best
single candidate and with random sets of K candidates (the mean over `random_draws` draws, per class as overall). The
kept prompts are written as a prompt folder (`NAME.png` and `NAME.mask.png` at the model's input size: the tensors
that were scored) that `prompts.uri` takes, with `report.json` beside them.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import ray
from PIL import Image

from model import check_checkpoint
from pipeline.config import absolute_uri, checkpoint_uri
from pipeline.prompts.scoring import PromptScorer, prompt_tensors, scores, split_rows
from pipeline.results import Evaluation, bootstrap, class_iou, mean_iou
from pipeline.storage.pairs import LabelledSource, labelled_pairs, read_labelled

REPORT_FILE = "report.json"
FEW_VALIDATION_IMAGES = 20  # fewer than this: a warning that the scores cannot tell sets apart
WIDE_INTERVAL = 0.1  # a kept step's 95% interval wider than this: the same warning


class SelectionError(ValueError):
    """A pool or request that prompts cannot be chosen from; the message says why."""


@dataclass
class Selection:
    names: list[str]  # the chosen prompts, in the order chosen
    steps: list[dict[str, Any]]  # each step's added key and scores
    best_single: dict[str, Any]
    random: dict[str, Any]
    counts: dict[str, int]  # training, validation, candidates, skipped
    to: str
    kept: dict[str, Any] = field(default_factory=dict)  # step, why
    warnings: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [(f"step {s['step']}: + {s['key']}", s) for s in self.steps]
        rows += [
            (f"best single: {self.best_single['key']}", self.best_single),
            (f"random {len(self.steps)}-sets (mean of {self.random['draws']})", self.random),
        ]
        width = max(len(label) for label, _ in rows) + 2
        lines = [
            f"{'':<{width}}{'mean IoU':>10}{'95% interval':>16}" + "".join(f"{name[:12]:>13}" for name in self.classes)
        ]
        for label, row in rows:
            interval = row.get("interval")
            spread = f"{interval[0]:.3f}..{interval[1]:.3f}" if interval else ""
            lines.append(
                f"{label:<{width}}{row['mean_iou']:>10.3f}{spread:>16}"
                + "".join(f"{_cell(row['iou'].get(name)):>13}" for name in self.classes)
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        c = self.counts
        warnings = "".join(f"\nwarning: {warning}" for warning in self.warnings)
        return (
            f"{self.table()}\nvalidation images {c['validation']}, training images {c['training']}, candidates "
            f"{c['candidates']}, unusable pairs skipped {c['skipped']}\nkept step {self.kept['step']}: "
            f"{self.kept['why']}{warnings}\nprompt folder: {self.to} ({len(self.names)} prompts, for "
            f"prompts.uri; report: {self.to.rstrip('/')}/{REPORT_FILE})"
        )


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def select_prompts(
    pool_uri: str | tuple[str, ...],
    *,
    checkpoint: str,
    classes: tuple[str, ...],
    k: int,
    to: str,
    val_fraction: float | None = None,
    candidates: int = 32,
    random_draws: int = 5,
    seed: int = 0,
    format: str = "auto",
    embedding: str = "semantic",
    actors: int = 1,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> Selection:
    """Choose up to `k` prompts for `classes` from the pool at `pool_uri` and write them as a prompt folder at `to`.
    `val_fraction` None: 0.3 of the pool, at most about 300 images."""
    options = storage_options or {}
    pool_uri = absolute_uri(pool_uri) if isinstance(pool_uri, str) else tuple(map(absolute_uri, pool_uri))
    checkpoint, to = checkpoint_uri(checkpoint), absolute_uri(to)
    if k < 1 or candidates < k or not (val_fraction is None or 0 < val_fraction < 1):
        raise SelectionError(
            f"need 1 <= k <= candidates and 0 < val_fraction < 1, got k={k}, "
            f"candidates={candidates}, val_fraction={val_fraction}"
        )
    size = check_checkpoint(checkpoint, storage_options=options).input_size
    pool = _Pool.read(
        LabelledSource(pool_uri, format, config_key="POOL_URI", classes=tuple(classes)),
        options,
        size,
        classes,
        val_fraction,
        seed,
        k,
    )
    rng = np.random.default_rng(seed)
    picks = _candidates(pool.train, pool.present, classes, candidates, rng)
    images, labels = _fetch(pool.blocks, pool.where[picks])
    names = [str(pool.keys[i]) for i in picks]
    log(f"select-prompts: {len(picks)} candidates, {int(pool.validation.sum())} validation images")
    scorer = PromptScorer(
        checkpoint,
        prompt_tensors(images, labels, len(classes) + 1),
        classes=classes,
        embedding=embedding,
        storage_options=options,
        actors=actors,
    )
    try:
        draws = [sorted(rng.choice(len(picks), k, replace=False).tolist()) for _ in range(random_draws)]
        scored = scorer.score(pool.blocks, [[i] for i in range(len(picks))] + draws, validation=True)
        singles, random = scored[: len(picks)], scored[len(picks) :]
        chosen, step_scores = _greedy(scorer, pool.blocks, singles, pool.present[picks], k, classes, names, log)
    finally:
        scorer.close()
    steps = [
        {"step": step, "key": names[i], **scores(evaluation)}
        for step, (i, evaluation) in enumerate(zip(chosen, step_scores), start=1)
    ]
    kept = keep_step(step_scores, seed)
    chosen = chosen[: kept["step"]]
    best_single = max(range(len(picks)), key=lambda i: _rank(singles[i]))
    selection = Selection(
        names=_write_prompts(to, [names[i] for i in chosen], images[chosen], labels[chosen], options),
        steps=steps,
        classes=list(classes),
        to=to,
        kept=kept,
        warnings=_warnings(step_scores[kept["step"] - 1], int(pool.validation.sum())),
        best_single={"key": names[best_single], **scores(singles[best_single])},
        random={"draws": random_draws, **_mean_scores(random, [[names[i] for i in draw] for draw in draws])},
        counts={
            "training": len(pool.train),
            "validation": int(pool.validation.sum()),
            "candidates": len(picks),
            "skipped": pool.skipped,
        },
    )
    for warning in selection.warnings:
        log(f"select-prompts: warning: {warning}")
    _write_report(
        selection,
        pool_uri=pool_uri,
        checkpoint=checkpoint,
        k=k,
        seed=seed,
        val_fraction=pool.val_fraction,
        embedding=embedding,
        storage_options=options,
    )
    return selection


@dataclass
class _Pool:
    """The pool read once into Ray's object store, split into training and validation rows; indices into `keys`."""

    blocks: list[ray.ObjectRef]
    keys: np.ndarray  # of the usable rows, sorted
    where: np.ndarray  # (block, row) of each
    validation: np.ndarray  # bool per key
    present: np.ndarray  # (keys, classes + 1) bool: which classes each image's truth shows
    skipped: int  # unusable rows
    val_fraction: float

    @property
    def train(self) -> np.ndarray:
        return np.flatnonzero(~self.validation)

    @classmethod
    def read(
        cls,
        source: LabelledSource,
        options: dict[str, Any],
        size: tuple[int, int],
        classes: tuple[str, ...],
        val_fraction: float | None,
        seed: int,
        k: int,
    ) -> _Pool:
        """Read and split the pool; `SelectionError` unless it has a validation image and `k` training images."""
        items = labelled_pairs(source, options, len(classes))
        if not ray.is_initialized():
            ray.init(configure_logging=False)
        rows = read_labelled(items, source, options, size, len(classes)).materialize()
        val_fraction = val_fraction or default_val_fraction(rows.count())
        blocks = split_rows(rows, val_fraction, seed, len(classes) + 1).materialize().to_numpy_refs()
        pool = cls(blocks, *_index(blocks), val_fraction)
        if not pool.validation.any() or len(pool.train) < k:
            raise SelectionError(
                f"the pool has {int(pool.validation.sum())} validation and {len(pool.train)} "
                f"training images (val_fraction {val_fraction}): need at least 1 and k={k}"
            )
        return pool


def _greedy(
    scorer: PromptScorer,
    blocks: list[ray.ObjectRef],
    singles: list[Evaluation],
    present: np.ndarray,
    k: int,
    classes: tuple[str, ...],
    names: list[str],
    log: Callable[[str], None],
) -> tuple[list[int], list[Evaluation]]:
    """The candidates chosen step by step (each the best added to those before, among those after which the remaining
    steps can still cover every class; `present`: the classes each candidate shows) and each step's evaluation."""
    shows = [frozenset(np.flatnonzero(row[1:]) + 1) for row in present]
    chosen: list[int] = []
    step_scores: list[Evaluation] = []
    need = frozenset(range(1, len(classes) + 1))
    for step in range(k):
        covered = frozenset().union(*(shows[i] for i in chosen))
        allowed = [
            i
            for i in range(len(shows))
            if i not in chosen and _can_cover(covered | shows[i], k - step - 1, shows, need)
        ]
        if not allowed:
            raise SelectionError(
                f"no {k} candidates together show every class {list(classes)}: raise --k or --candidates"
            )
        evaluations = (
            [singles[i] for i in allowed]
            if step == 0
            else scorer.score(blocks, [chosen + [i] for i in allowed], validation=True)
        )
        best, evaluation = max(zip(allowed, evaluations), key=lambda pair: _rank(pair[1]))
        chosen.append(best)
        step_scores.append(evaluation)
        log(f"select-prompts: step {step + 1}/{k}: + {names[best]}, mean IoU {evaluation.mean_iou:.3f}")
    return chosen, step_scores


def _write_report(
    selection: Selection, *, pool_uri: str | tuple[str, ...], storage_options: dict[str, Any], **request: Any
) -> None:
    """`report.json` beside the prompts: the request, what was kept and why, and every score."""
    report = {
        "pool": pool_uri,
        **request,
        "classes": selection.classes,
        "chosen": selection.names,
        "kept": selection.kept,
        "warnings": selection.warnings,
        "steps": selection.steps,
        "best_single": selection.best_single,
        "random": selection.random,
        "counts": selection.counts,
    }
    fs, root = fsspec.core.url_to_fs(selection.to, **storage_options)
    fs.pipe_file(f"{root}/{REPORT_FILE}", (json.dumps(report, indent=2) + "\n").encode())


def _index(blocks: list[ray.ObjectRef]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Of the usable rows, in key order (blocks come in no fixed order): keys, (block, row) where each is, validation
    and present; and the unusable rows' count."""
    parts = ray.get([_block_index.remote(block) for block in blocks])
    where = np.concatenate([np.stack([np.full(len(rows), b), rows], axis=1) for b, (rows, *_) in enumerate(parts)])
    keys, validation, present = (np.concatenate([part[i] for part in parts]) for i in (1, 2, 3))
    order = np.argsort(keys, kind="stable")
    return keys[order], where[order], validation[order], present[order], sum(part[4] for part in parts)


@ray.remote(num_cpus=0.25)
def _block_index(block: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    usable = np.flatnonzero(block["error"] == "")
    return (
        usable,
        block["key"][usable],
        block["validation"][usable],
        block["present"][usable],
        len(block["key"]) - len(usable),
    )


def _fetch(blocks: list[ray.ObjectRef], where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images and label maps at `where` ((block, row) pairs), fetching only the blocks that hold them."""
    held = {b: ray.get(blocks[b]) for b in sorted(set(where[:, 0].tolist()))}
    return (
        np.stack([held[b]["image"][r] for b, r in where.tolist()]),
        np.stack([held[b]["labels"][r] for b, r in where.tolist()]),
    )


def _candidates(
    train: np.ndarray, present: np.ndarray, classes: tuple[str, ...], count: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of the candidates: `count` training images drawn at random, plus for each class none of them shows
    the first other image (in the same random order) that shows it."""
    order = rng.permutation(train)
    chosen = list(order[:count])
    for c, name in enumerate(classes, start=1):
        if not present[chosen, c].any():
            showing = next((i for i in order[count:] if present[i, c]), None)
            if showing is None:
                raise SelectionError(f"class {name!r} shows in no image of the pool's training part")
            chosen.append(showing)
    return np.array(chosen)


def _can_cover(covered: frozenset, slots: int, shows: list[frozenset], need: frozenset) -> bool:
    """Whether `slots` more candidates can complete `covered` to `need`."""
    reachable = {covered & need}
    for _ in range(slots):
        reachable |= {state | (show & need) for state in reachable for show in set(shows)}
    return need in reachable


def default_val_fraction(pool_images: int) -> float:
    """The held-out share when none is asked for: 0.3, or about 300 images of a pool over 1000."""
    return min(0.3, 300 / max(pool_images, 1))


def keep_step(evaluations: list[Evaluation], seed: int) -> dict[str, Any]:
    """Which step's set to write (1-based) and why: the best step's, or the fewest prompts not measurably worse (the
    95% paired-bootstrap interval of the best's advantage over it, on the same validation images, reaches 0)."""
    best = int(np.argmax([_rank(evaluation) for evaluation in evaluations]))  # the first of equals
    if np.isnan(evaluations[best].mean_iou):
        return {"step": 1, "why": "no step could be scored: no class shows in the validation images' truth or labels"}
    top = np.stack(list(evaluations[best].per_image.values()))
    for step in range(best):
        low, high = bootstrap(top, paired=np.stack(list(evaluations[step].per_image.values())), seed=seed)
        if low <= 0:
            return {
                "step": step + 1,
                "why": (
                    f"fewer prompts, and not measurably worse than step {best + 1}'s best score "
                    f"{evaluations[best].mean_iou:.3f} (its advantage, 95% interval {low:+.3f}..{high:+.3f}, reaches 0)"
                ),
            }
    later = "" if best == len(evaluations) - 1 else "; later steps scored lower"
    fewer = "; every step before it scored measurably lower" if best else ""
    return {"step": best + 1, "why": f"the highest validation mean IoU, {evaluations[best].mean_iou:.3f}{fewer}{later}"}


def _rank(evaluation: Evaluation) -> float:
    """A set's mean IoU for choosing; one that could not be scored (NaN) ranks last."""
    return -np.inf if np.isnan(evaluation.mean_iou) else evaluation.mean_iou


def _warnings(kept: Evaluation, validation_images: int) -> list[str]:
    low, high = kept.interval()
    if validation_images >= FEW_VALIDATION_IMAGES and high - low <= WIDE_INTERVAL:  # NaN (unscored) compares False
        return []
    return [
        f"{validation_images} validation images: the kept set's mean IoU is {kept.mean_iou:.3f} with a 95% "
        f"interval of {low:.3f}..{high:.3f}, too wide to tell the candidates apart; a larger pool or "
        f"--val-fraction gives a choice worth more"
    ]


def _mean_scores(evaluations: list[Evaluation], prompts: list[list[str]]) -> dict[str, Any]:
    """The random sets' scores: overall and per class, each the mean over the draws of a draw's own (a class a draw
    has in neither truth nor labels leaves that draw out of the class's mean), and each draw's."""
    names = evaluations[0].classes[1:]
    per_class = np.array([class_iou(evaluation.counts)[1:] for evaluation in evaluations])  # (draws, classes)
    means = [float(mean_iou(evaluation.counts)) for evaluation in evaluations]
    counted = (~np.isnan(per_class)).sum(0)
    class_means = np.where(counted > 0, np.nansum(per_class, 0) / np.maximum(counted, 1), np.nan)
    return {
        "mean_iou": float(np.mean(means)),
        "draws_mean_iou": means,
        "iou": {name: None if np.isnan(value) else float(value) for name, value in zip(names, class_means)},
        "sets": [{"prompts": keys, **scores(evaluation)} for keys, evaluation in zip(prompts, evaluations)],
    }


def _write_prompts(
    to: str, keys: list[str], images: np.ndarray, labels: np.ndarray, storage_options: dict[str, Any]
) -> list[str]:
    """Write `NAME.png` and `NAME.mask.png` per prompt under `to`; returns the names (step, then the key's stem)."""
    fs, root = fsspec.core.url_to_fs(to, **storage_options)
    fs.makedirs(root, exist_ok=True)
    names = []
    for step, (key, image, label) in enumerate(zip(keys, images, labels), start=1):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", posixpath.splitext(key)[0]).strip("._") or "prompt"
        name = f"{step}-{stem[:100]}"
        for suffix, array in ((".png", image), (".mask.png", label)):
            data = io.BytesIO()
            Image.fromarray(array).save(data, format="PNG")
            fs.pipe_file(f"{root}/{name}{suffix}", data.getvalue())
        names.append(name)
    return names
