"""Figures: FROC curve, reliability diagram, and the ROC/reliability plot of a retraining."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import ECE_BINS, FROC_FP_RATES, _sensitivity_curve, calibration, cluster_auc
from .pairing import SCORE_LABELS, SCORES


def _rate_label(r: float) -> str:
    return f"1/{int(round(1 / r))}" if r < 1 else f"{r:g}"


def plot_froc(report: dict, path: str | Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(6.4, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rates = np.geomspace(FROC_FP_RATES[0] / 1.5, FROC_FP_RATES[-1] * 1.5, 200)
    styles = {"confidence": ("tab:blue", "-", "o"), "mean_probability": ("tab:orange", "--", "s")}
    handles = []
    for s in SCORES:
        fr = report["detection"]["froc"].get(s)
        if not fr:
            continue
        color, ls, marker = styles[s]
        ax.plot(rates, _sensitivity_curve(fr, rates), color=color, ls=ls, lw=1.8)
        ax.plot(fr["fp_rates"], fr["sensitivity"], color=color, ls="none", marker=marker)
        handles.append(Line2D([], [], color=color, ls=ls, marker=marker, label=f"{SCORE_LABELS[s]}: CPM {fr['cpm']:.3f}"))
    ax.set_xscale("log", base=2)
    ax.set_xticks(FROC_FP_RATES)
    ax.set_xticklabels([_rate_label(r) for r in FROC_FP_RATES])
    ax.set_xlim(rates[0], rates[-1])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("false positives per case")
    ax.set_ylabel("lesion sensitivity")
    d = report["detection"]
    ax.set_title(f"FROC: {d['n_cases']} case(s), {d['n_gt_lesions']} lesion(s), {d['n_clusters']} cluster(s)")
    ax.grid(True, which="both", alpha=0.3)
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no ground-truth lesions: FROC undefined", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(str(path))


def plot_reliability(report: dict, path: str | Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0.12, 0.36, 0.83, 0.56])
    hx = fig.add_axes([0.12, 0.08, 0.83, 0.2], sharex=ax)
    ax.plot([0, 1], [0, 1], color="0.5", ls=":", lw=1, label="perfect calibration")
    styles = {"confidence": ("tab:blue", "-", "o", -0.02), "mean_probability": ("tab:orange", "--", "s", 0.02)}
    n_bins = ECE_BINS
    for s in SCORES:
        cal = report["calibration"].get(s)
        if not cal:
            continue
        color, ls, marker, dx = styles[s]
        n_bins = cal["n_bins"]
        xs = [b["mean_score"] for b in cal["bins"] if b["count"]]
        ys = [b["fraction_tp"] for b in cal["bins"] if b["count"]]
        ax.plot(xs, ys, color=color, ls=ls, marker=marker, label=f"{SCORE_LABELS[s]}: ECE {cal['ece']:.3f}")
        centers = [(b["lo"] + b["hi"]) / 2 + dx for b in cal["bins"]]
        hx.bar(centers, [b["count"] for b in cal["bins"]], width=0.8 / n_bins / 2, color=color, alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction of clusters that are true positives")
    ax.set_title(f"Reliability ({n_bins} bins, {report['detection']['n_clusters']} clusters)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.tick_params(labelbottom=False)
    hx.set_xlabel("score (bin mean)")
    hx.set_ylabel("clusters")
    hx.grid(True, alpha=0.3)
    fig.savefig(str(path))


def save_validation_plot(oof: dict, path, title: str = "") -> Path:
    """ROC curve and reliability diagram of the old and the new classifier (PNG, Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    y = np.asarray(oof["labels"])
    fig = Figure(figsize=(7.2, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    bins = np.linspace(0, 1, 11)
    for key, color, label in (("old", "#888888", "before"), ("new", "#1f77b4", "after")):
        p = np.asarray(oof[key])
        rank = np.asarray(oof.get(f"{key}_rank", p))  # the new model's ROC uses its out-of-fold logits
        if len(set(y.tolist())) == 2:
            fpr, tpr, _ = roc_curve(y, rank)
            ax1.plot(fpr, tpr, color=color, label=f"{label} AUC {cluster_auc(rank, y):.3f}")
        idx = np.clip(np.digitize(p, bins) - 1, 0, 9)
        xs, ys = [], []
        for b in range(10):
            sel = idx == b
            if sel.any():
                xs.append(p[sel].mean())
                ys.append(y[sel].mean())
        cal = calibration(p, y) if len(y) else None
        ece = None if cal is None else cal["ece"]
        ax2.plot(xs, ys, "o-", color=color, label=f"{label} ECE {ece:.3f}" if ece is not None else label)
    ax1.plot([0, 1], [0, 1], ":", color="#bbbbbb")
    ax1.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC (out-of-fold)")
    ax2.plot([0, 1], [0, 1], ":", color="#bbbbbb")
    ax2.set(xlabel="confidence", ylabel="fraction true lesions", title="reliability", xlim=(0, 1), ylim=(0, 1))
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    if len(set(y.tolist())) < 2:
        ax1.text(0.5, 0.5, "one class only:\nno ROC", ha="center", va="center", transform=ax1.transAxes)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
