"""Analyses of trained runs: layer responses (the paper's Fig. 7)."""

from resnet_cluster.analysis.responses import (
    layer_responses,
    plot_responses,
    responses_of,
    write_csv,
)

__all__ = ["layer_responses", "plot_responses", "responses_of", "write_csv"]
