"""Make the documentation's figures (docs/figures/*.png, committed) from small real computations.

    python docs/make_figures.py            # every figure (one small run: ~260 CPU seconds)
    python docs/make_figures.py lengths    # only some: hooks scopes directions lengths run

``hooks`` and ``scopes`` are drawn from their definitions; ``directions`` draws each registered
built-in generator's directions on 2-d Gaussian "activations" with the package's own code;
``lengths`` plots the grids ``resolve_lengths`` gives; ``run`` makes one small sensitive-directions
run of the embedded SmolLM2 (the main preset with fewer tokens and lengths, kept in
``runs/docs-figures``) and draws the metrics, statistics and verdicts figures and figure 1 from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "figures"
RUN_DIR = REPO / "runs" / "docs-figures"
PRESET = REPO / "configs" / "sensitive_directions_smollm2.yaml"
# The main preset on fewer tokens and lengths (12 x 32 tokens, 8 lengths): ~2 min on 2 cores.
RUN_OVERRIDES = [
    "data.seq_len=32",
    "lengths=[0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.9]",
    "shard_seqs=6",
]
DPI = 96


def _save(fig: plt.Figure, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / f"{name}.png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote docs/figures/{name}.png ({(OUT / f'{name}.png').stat().st_size // 1024} KB)")


def _box(ax: plt.Axes, x: float, y: float, text: str, color: str = "#f0f0f0") -> None:
    ax.text(x, y, text, ha="center", va="center", fontsize=9,
            bbox={"boxstyle": "round,pad=0.35", "fc": color, "ec": "#555"})  # fmt: skip


def hooks() -> None:
    """One block's hook points along the residual stream, and where the run resumes."""
    fig, ax = plt.subplots(figsize=(7.5, 2.4))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 3)
    ax.axis("off")
    ax.annotate("", (9.8, 1), (0.2, 1), arrowprops={"arrowstyle": "->", "lw": 1.5})
    ax.text(9.8, 1.15, "residual stream", fontsize=8, color="#555", ha="right")
    points = [(1.0, "hook_resid_pre"), (9.0, "hook_resid_post")]
    for x, name in points:
        ax.plot([x], [1], "o", color="k")
        ax.text(x, 0.55, name, ha="center", fontsize=8)
    for x0, label, out in ((2.0, "attention", "hook_attn_out"), (6.0, "MLP", "hook_mlp_out")):
        ax.annotate("", (x0 + 0.4, 2.0), (x0 - 0.3, 1.05), arrowprops={"arrowstyle": "->"})
        _box(ax, x0 + 0.9, 2.2, label)
        ax.annotate("", (x0 + 2.2, 1.05), (x0 + 1.5, 2.0), arrowprops={"arrowstyle": "->"})
        ax.text(x0 + 1.95, 1.65, out, fontsize=8, color="#0072B2")
        ax.plot([x0 + 2.2], [1], "P", color="#0072B2", ms=8)
    ax.annotate("x + alpha d", (1.0, 1.1), (0.4, 2.6), fontsize=9, color="#D55E00",
                arrowprops={"arrowstyle": "->", "color": "#D55E00"})  # fmt: skip
    ax.set_title("blocks.{l}: the hook points (TransformerLens names)", fontsize=10)
    _save(fig, "hooks")


def scopes(n: int = 6) -> None:
    """For one sequence: which perturbed positions (columns) each measured output (rows) sees."""
    fig, axes = plt.subplots(1, 3, figsize=(8, 2.6), sharey=True)
    cases = {
        "all-positions: 1 perturbed copy": np.tril(np.ones((n, n))),
        "single-position: one copy per position": np.eye(n),
        "last-position: 1 copy": np.diag([0.0] * (n - 1) + [1.0]),
    }
    cmap = matplotlib.colors.ListedColormap(["#f4f4f4", "#009E73"])
    for ax, (name, grid) in zip(axes, cases.items(), strict=True):
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("perturbed position", fontsize=8)
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("measured at position", fontsize=8)
    fig.tight_layout()
    _save(fig, "scopes")


def directions() -> None:
    """Each built-in generator's unit directions from one activation x, on 2-d Gaussian data."""
    import torch

    from perturb_lens.directions import DirectionContext, make_directions
    from perturb_lens.plots.style import color_for
    from perturb_lens.statistics.activations import fit_stats

    gen = torch.Generator().manual_seed(0)
    cov = torch.tensor([[9.0, 2.5], [2.5, 1.2]])
    acts = torch.randn(2000, 2, generator=gen) @ torch.linalg.cholesky(cov).T + torch.tensor([4, 1])
    stats = fit_stats([acts], exclude_first_position=False)
    x = torch.tensor([[7.0, 0.0]]).repeat(40, 1)  # one token, 40 draws
    names = ["isotropic", "isotropic-difference", "cov-random-difference", "cov-random-mixture",
             "real-difference", "real-mixture", "ablation"]  # fmt: skip
    fig, axes = plt.subplots(2, 4, figsize=(9, 3.0), sharex=True, sharey=True)
    for ax, name in zip(axes.flat, names, strict=False):
        ctx = DirectionContext(x=x, stats=stats, pool=acts[:500], generator=gen)
        d = make_directions(name, ctx).numpy()
        ax.scatter(acts[:400, 0], acts[:400, 1], s=2, color="#bbb")
        ax.quiver(x[:, 0], x[:, 1], 3 * d[:, 0], 3 * d[:, 1], angles="xy", scale_units="xy",
                  scale=1, color=color_for(name), width=0.006, alpha=0.6)  # fmt: skip
        ax.plot([7], [0], "k*", ms=8)
        ax.set_title(name, fontsize=8)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    ax = axes.flat[-1]
    ax.axis("off")
    ax.text(0, 0.5, "grey: real activations\n*: the token's x\narrows: 40 draws of d\n(length 3)",
            fontsize=8, transform=ax.transAxes, va="center")  # fmt: skip
    fig.tight_layout()
    _save(fig, "directions")


def lengths() -> None:
    """The preset length grids."""
    from perturb_lens.config.lengths import resolve_lengths

    grids = ["published", "sae", "0..101", "t101"]
    fig, axes = plt.subplots(len(grids), 1, figsize=(7, 2.6))
    for ax, name in zip(axes, grids, strict=True):
        values = resolve_lengths(name)
        ax.plot(values, np.zeros(len(values)), "|", ms=10, color="#0072B2")
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.spines[["left", "right", "top"]].set_visible(False)
        ax.text(1.01, 0.5, f"{len(values)} lengths", transform=ax.transAxes, fontsize=7,
                va="center")  # fmt: skip
    axes[-1].set_xlabel("alpha (t101: a fraction of y - x)", fontsize=8)
    fig.tight_layout()
    _save(fig, "lengths")


def small_run() -> Path:
    """The main preset on 12 x 32 tokens and 8 lengths (made once, then reused)."""
    import perturb_lens as pl

    config = pl.load_config(PRESET, RUN_OVERRIDES)
    return pl.run_experiment(config, RUN_DIR, resume=RUN_DIR.exists(), progress=False)


def run_figures() -> None:
    """Metrics, statistics, verdicts and figure 1 of the small run."""
    import perturb_lens as pl
    from perturb_lens.analysis.verdicts import claim_intervals
    from perturb_lens.plots.style import color_for
    from perturb_lens.statistics.activations import ActivationStats

    run = small_run()
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for ax, metric, label in ((axes[0], "kl", "mean KL [nats]"), (axes[1], "l2", "mean L2")):
        cv = run.curves(metric)
        for name, g in cv.groupby("direction", observed=True):
            ax.plot(g["length"], g["mean"], "o-", ms=3, label=name, color=color_for(str(name)))
        ax.set_xlabel("length alpha", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].axhline(0.1, color="#999", ls="--", lw=1)
    axes[0].text(0, 0.12, "threshold 0.1", fontsize=7, color="#777")
    axes[1].legend(fontsize=6, loc="upper left")
    fig.suptitle("SmolLM2-135M, blocks.15.hook_resid_pre, 12 x 32 tokens", fontsize=9)
    fig.tight_layout()
    _save(fig, "metrics")

    stats = ActivationStats.load(run / "stats.safetensors")
    eig = np.sort(np.linalg.eigvalsh(stats.cov.numpy()))[::-1]
    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.semilogy(np.arange(1, eig.size + 1), eig, color="#D55E00", label="covariance eigenvalues")
    ax.axhline(eig.mean(), color="#56B4E9", ls="--", label="isotropic, same total variance")
    ax.set_xlabel("component (largest first)", fontsize=8)
    ax.set_ylabel("variance", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title(f"statistics at {stats.hook}: {stats.n_tokens:,} tokens", fontsize=9)
    _save(fig, "statistics")

    ci = claim_intervals(run)
    claims = list(dict.fromkeys(ci["claim"]))
    fig, axes = plt.subplots(1, len(claims), figsize=(2.4 * len(claims), 2.6), sharey=True)
    colors = {"holds": "#009E73", "reversed": "#D55E00", "inconclusive": "#999999",
              "skipped": "#dddddd"}  # fmt: skip
    for ax, claim in zip(np.atleast_1d(axes), claims, strict=True):
        g = ci[(ci["claim"] == claim) & (ci["outcome"] != "skipped")]
        for outcome, h in g.groupby("outcome"):
            ax.errorbar(h["length"], h["ratio"], yerr=[h["ratio"] - h["ci_low"],
                        h["ci_high"] - h["ratio"]], fmt="o", ms=3, color=colors[outcome],
                        label=outcome)  # fmt: skip
        ax.axhline(1, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_yticks([0.25, 0.5, 1, 2, 4], ["0.25", "0.5", "1", "2", "4"])
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if " ~ " in claim:  # "about equal": the ratio within the band
            for edge in ci.attrs["band"]:
                ax.axhline(edge, color="#777", ls=":", lw=0.8)
        ax.set_title(claim.replace(" > ", " >\n").replace(" ~ ", " ~\n"), fontsize=7)
        ax.set_xlabel("length", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    np.atleast_1d(axes)[0].set_ylabel("ratio of means a / b (95 % CI)", fontsize=7)
    fig.tight_layout()
    _save(fig, "verdicts")

    fig1 = pl.plot(run, "fig1")
    fig1.savefig(OUT / "sensitive_directions_fig1.png", dpi=72, bbox_inches="tight")
    print("wrote docs/figures/sensitive_directions_fig1.png")


FIGURES = {"hooks": hooks, "scopes": scopes, "directions": directions, "lengths": lengths,
           "run": run_figures}  # fmt: skip


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(FIGURES)
    unknown = [c for c in chosen if c not in FIGURES]
    if unknown:
        sys.exit(f"unknown figure(s) {unknown}: choose from {', '.join(FIGURES)}")
    for name in chosen:
        FIGURES[name]()
