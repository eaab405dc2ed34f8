"""Reading a finished run for figures, reports and :class:`~perturb_lens.workflows.run_handle.Run`:
:class:`RunReader` streams a run's aggregates once per metric (rows or aggregate runs alike) and
derives its curves, tables and token sample from them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from perturb_lens.common.registry import registry
from perturb_lens.metrics.builtin import metric_names
from perturb_lens.results.aggregate import (
    Aggregates,
    aggregate_curves,
    merge,
    run_metric_aggregates,
    sample_rows,
    summary_means,
    threshold_histogram,
    threshold_summary,
)
from perturb_lens.results.frames import pick_lengths
from perturb_lens.results.shards import results_mode, shard_columns
from perturb_lens.results.store import load_manifest
from perturb_lens.results.summary import summary_rows


class RunReader:
    """A run directory read for figures and reports: manifest, streamed aggregates and the curves
    from them (:func:`~perturb_lens.results.aggregate.run_aggregates`: the same code for a rows
    and an aggregate run, memory flat in the rows), a bounded token sample, and (for the figures
    that need every row: interpolation experiments' per-curve statistics, same-cosine token
    scatters) the rows themselves."""

    def __init__(self, run_dir: str | Path, label: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.manifest = load_manifest(self.run_dir)
        self.label = label or self.run_dir.name
        self._curves: dict[str, pd.DataFrame] = {}
        self._aggregates: dict[str, Aggregates] = {}

    @property
    def config(self) -> dict[str, Any]:
        """The run's validated config (as stored in the manifest)."""
        return self.manifest.get("config", {})

    @property
    def meta(self) -> dict[str, Any]:
        """What the run recorded about itself (model, hook, scope, lengths, ...)."""
        return self.manifest.get("meta", {})

    @property
    def experiment(self) -> str:
        """The experiment type (config ``experiment``), which selects the figure set."""
        return str(self.config.get("experiment", "sensitive-directions"))

    @property
    def experiment_info(self) -> Any:
        """The registered experiment of the run (an ``ExperimentInfo``; None: not registered in
        this process), as declared: its code is not imported (figures need none of it). Looked
        up by kind: the experiments are a later stage."""
        return registry("experiment").find(self.experiment)

    @property
    def curve_stats(self) -> tuple[str, ...]:
        """The per-curve statistics the run's experiment compares (interpolation experiments)."""
        info = self.experiment_info
        return info.curve_stats if info is not None else ()

    @cached_property
    def rows(self) -> pd.DataFrame:
        """The rows that enter the published averages (``results.summary.summary_rows``): all of
        them in memory, so only for the figures that need every row."""
        if results_mode(self.manifest) == "aggregate":
            raise ValueError(
                f"{self.run_dir} is an aggregate run (results: aggregate): it stores no rows; "
                "use its curves and aggregates, or rerun with results: rows"
            )
        return summary_rows(self.run_dir)

    @cached_property
    def columns(self) -> list[str]:
        """The result columns: a rows run's shard schema, an aggregate run's metrics."""
        if results_mode(self.manifest) == "aggregate":
            return list(self.config.get("metrics", []))
        return shard_columns(self.run_dir, self.manifest)

    @property
    def metrics(self) -> list[str]:
        """Metric columns of the results, in the config's order."""
        known = metric_names()
        wanted = list(self.config.get("metrics", known)) + list(known)
        return [m for m in dict.fromkeys(wanted) if m in self.columns]

    def aggregates(self, metric: str) -> Aggregates:
        """The run's merged aggregates of ``metric`` (streamed once per metric)."""
        if metric not in self._aggregates:  # all metrics in one pass over the shards
            wanted = [metric, *(m for m in self.metrics if m not in self._aggregates)]
            self._aggregates.update(
                run_metric_aggregates(self.run_dir, list(dict.fromkeys(wanted)))
            )
        return self._aggregates[metric]

    def curves(self, metric: str) -> pd.DataFrame:
        """Curves per direction and length (``analysis.curves`` layout; exact means, sketch
        quantiles, sequence-bootstrap intervals: ``aggregate_curves``), once per metric."""
        if metric not in self._curves:
            self._curves[metric] = aggregate_curves(self.aggregates(metric))
        return self._curves[metric]

    def pooled(
        self,
        metric: str,
        groups: Mapping[str, Sequence[str]],
        stat: Sequence[str] = ("mean",),
    ) -> pd.DataFrame:
        """Per group (label -> directions): ``n``, ``stat`` and the sequence-bootstrap interval
        of ``metric`` over every row of its directions at every length, from the streamed
        aggregates (merged exactly: :func:`~perturb_lens.results.aggregate.merge`). The layout of
        ``analysis.curves(rows, by=["direction"])`` with the labels as directions, in ``groups``
        order; also for columns such as ``size`` that a rows run stores beside its metrics."""
        agg = self.aggregates(metric)
        label_of = {d: label for label, names in groups.items() for d in names}

        def relabel(frame: pd.DataFrame) -> pd.DataFrame:
            names = frame["direction"].astype(str)
            keep = names.isin(label_of).to_numpy()
            return frame[keep].assign(direction=names[keep].map(label_of).to_numpy(), length=0.0)

        part = {kind: relabel(getattr(agg, kind)) for kind in ("moments", "sketch", "seq")}
        for kind in ("threshold", "sample"):  # not pooled: none (and no stale categories)
            part[kind] = getattr(agg, kind).iloc[:0].astype({"direction": str})
        merged = merge([part])
        for frame in merged.values():
            frame["direction"] = pd.Categorical(frame["direction"], categories=list(groups))
        pooled = Aggregates(metric, **merged, alpha=agg.alpha, labels=list(groups))
        return aggregate_curves(pooled, stat=stat).drop(columns="length")

    @property
    def grid(self) -> np.ndarray:
        """The lengths the run has results at, sorted."""
        return self.aggregates(self.metrics[0]).grid

    @property
    def lengths_frame(self) -> pd.DataFrame:
        """The grid as a frame with a ``length`` column (for ``analysis.pick_lengths``)."""
        return pd.DataFrame({"length": self.grid})

    def token_sample(self, metric: str) -> pd.DataFrame:
        """Rows of a bounded sample of tokens (the first sequences, ``aggregate.SAMPLE_SEQS``)."""
        return sample_rows(self.aggregates(metric))

    def bars(self, metric: str, lengths: Sequence[float] | None = None) -> pd.DataFrame:
        """``analysis.bars`` from the curves: the curve rows at the grid lengths nearest to
        ``lengths``."""
        picked = pick_lengths(self.lengths_frame, lengths)
        cv = self.curves(metric)
        out = cv[cv["length"].isin(picked)].reset_index(drop=True)
        out.attrs.update(cv.attrs, lengths=picked)
        return out

    def summary(self, metric: str, lengths: Sequence[float] | None = None) -> pd.DataFrame:
        """``analysis.summary_table`` of one metric from the curves."""
        picked = pick_lengths(self.lengths_frame, lengths)
        return summary_means(self.curves(metric), metric, picked)

    def _crossings(self, metric: str, threshold: float) -> Aggregates:
        agg = self.aggregates(metric)
        stored = agg.threshold["threshold"].dropna().unique()
        if stored.size != 1 or stored[0] != threshold:
            raise ValueError(
                f"the run's {metric} crossings are counted at its registered threshold "
                f"{stored.tolist()}, not {threshold}"
            )
        return agg

    def threshold_summary(self, metric: str, threshold: float) -> pd.DataFrame:
        """``analysis.threshold_summary`` from the streamed crossing counts."""
        return threshold_summary(self._crossings(metric, threshold))

    def prefetch_curves(self, metrics: Iterable[str]) -> None:
        """The curves of several metrics (their aggregates are read in one pass over the shards)."""
        for metric in dict.fromkeys(metrics):
            self.curves(metric)

    def threshold_histogram(self, metric: str, threshold: float, edges: np.ndarray) -> pd.DataFrame:
        """``analysis.histograms`` (``right=True``) of the first-crossing lengths on ``edges``."""
        return threshold_histogram(self._crossings(metric, threshold), edges)
