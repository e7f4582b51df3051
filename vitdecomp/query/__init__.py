"""Queries over a store: CompAttribute, retrieval, mean-ablation curves, spurious-feature mitigation,
token heatmaps and the static HTML report."""
from .compattribute import DEFAULT_PROPERTIES, compattribute, named_properties, read_properties
from .jobs import run_ablate, run_compattribute, run_mitigate, run_report, run_retrieve
from .heatmap_job import run_heatmap

__all__ = ["DEFAULT_PROPERTIES", "compattribute", "named_properties", "read_properties", "run_ablate",
           "run_compattribute", "run_heatmap", "run_mitigate", "run_report", "run_retrieve"]
