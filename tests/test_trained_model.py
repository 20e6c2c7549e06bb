"""The bundled trained model through the whole labelling job, scored against ground truth on synthetic tasks that
training never saw (its pairs come from `default_rng([data seed, step, rank])`; these from seeds of another shape)."""

from __future__ import annotations

import pytest

from jobs.autolabel import DEMO
from jobs.demo.build import write_sample
from pipeline.evaluate import evaluate
from pipeline.job import autolabel

MEAN_IOU_FLOOR = 0.6  # over the foreground classes of all held-out tasks together


@pytest.mark.parametrize("seed", [101, 202, 303])
def test_the_job_with_the_bundled_model_segments_held_out_tasks(seed, tmp_path, ray_session):
    root = tmp_path / "task"
    classes = write_sample(root, seed, images=8)
    config = {
        "input": {"uri": str(root / "images")},
        "prompts": {"uri": str(root / "prompts"), "classes": classes},
        "model": {"checkpoint": str(DEMO / "checkpoint")},
        "output": {"uri": str(tmp_path / "out")},
        "compute": {"batch_size": 4, "cpus_per_actor": 0.5},
    }
    summary = autolabel(config, log=lambda line: None)
    assert summary.ok == 8
    scores = evaluate(str(tmp_path / "out"), str(root / "truth"))
    assert scores.compared == 8 and scores.missing == []
    assert scores.mean_iou >= MEAN_IOU_FLOOR, scores.table()
    assert min(value for value in scores.iou[1:] if value is not None) >= MEAN_IOU_FLOOR - 0.2, scores.table()
