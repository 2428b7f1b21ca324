"""PNG plots of an importance document: importance across depth per method, and kept layers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from compressor.importance.base import depth_bands, depth_shares  # noqa: E402


def _minmax(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def plot_importance(doc: dict, out_dir: str | Path) -> list[Path]:
    """importance_by_method.png, importance_by_depth.png and selected_layers.png from an importance
    document (to_json shape)."""
    out = Path(out_dir)
    L = doc["num_layers"]
    layers = np.arange(L)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, m in doc["methods"].items():
        rho = m.get("spearman_vs_ablation")
        label = name if rho is None or name == "ablation" else f"{name} (ρ={rho:.2f})"
        style = dict(color="black", linewidth=2.5) if name == "ablation" else {}
        ax.plot(layers, _minmax(m["scores"]), marker="o", markersize=3, label=label, **style)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("importance (min-max normalised per method)")
    ax.set_title(f"Layer importance by method ({doc.get('samples', '?')} validation users)")
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    paths.append(out / "importance_by_method.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    names = list(doc["methods"])
    shares = np.array([depth_shares(doc["methods"][n]["weights"]) for n in names])
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.6))
    left = np.zeros(len(names))
    for b, band in enumerate(depth_bands(L)):
        ax.barh(names, shares[:, b], left=left, label=f"layers {band[0]}-{band[-1]}", color=f"C{b}")
        for i, v in enumerate(shares[:, b]):
            if v >= 0.06:
                ax.text(left[i] + v / 2, i, f"{v:.0%}", ha="center", va="center", fontsize=7, color="white")
        left += shares[:, b]
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("share of the method's importance weight")
    ax.set_title("Where importance sits by depth (lower / middle / upper layers)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    paths.append(out / "importance_by_depth.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    sel = doc.get("selections", {})
    names = sorted(sel) or ["(no selections)"]
    grid = np.zeros((len(names), L))
    for r, n in enumerate(names):
        grid[r, sel.get(n, [])] = 1
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * L + 4), max(2.5, 0.28 * len(names) + 1)))
    ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1.3, interpolation="nearest")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer (green = kept)")
    ax.set_title("Selected layers by strategy / method / budget")
    fig.tight_layout()
    paths.append(out / "selected_layers.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
