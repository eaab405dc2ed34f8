"""What a perturbation is measured by: output metrics (KL, JS, dCE, top-1 change) and downstream
metrics (L2, cosine), one :func:`register_metric` call each (:mod:`.builtin`)."""

from perturb_lens.metrics.builtin import (
    NONFINITE,
    Distributions,
    MetricInfo,
    check_metrics,
    get_metric,
    metric_names,
    register_metric,
)

__all__ = [
    "NONFINITE",
    "Distributions",
    "MetricInfo",
    "check_metrics",
    "get_metric",
    "metric_names",
    "register_metric",
]
