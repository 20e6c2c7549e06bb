"""What is done with labels: scoring them (`metrics`, the one IoU implementation; `evaluate`), exporting them
(`export`) and looking at them (`review`)."""

from pipeline.results.evaluate import evaluate, report, table
from pipeline.results.export import FORMATS, IMAGES, NAMES, ExportError, export
from pipeline.results.metrics import Evaluation, bootstrap, class_iou, mean_iou, overlap
from pipeline.results.review import ReviewError, review

__all__ = [
    "FORMATS",
    "IMAGES",
    "NAMES",
    "Evaluation",
    "ExportError",
    "ReviewError",
    "bootstrap",
    "class_iou",
    "evaluate",
    "export",
    "mean_iou",
    "overlap",
    "report",
    "review",
    "table",
]
