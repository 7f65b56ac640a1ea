"""PNG plots of a training run: loss curves, learning rate, MaxVio, and the per-layer expert load.

``minids plot RUN_DIR`` (or ``plot_run``) reads ``metrics.jsonl`` and ``expert_load.json`` of a run
directory and writes ``loss.png``, ``lr.png``, ``maxvio.png`` and ``expert_load.png`` beside them.
Needs matplotlib (``pip install 'minids[plots]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

from minids.fileio import written_whole

__all__ = ["PlotError", "plot_run", "read_metrics"]


class PlotError(RuntimeError):
    """Plots cannot be drawn (matplotlib missing)."""


def read_metrics(run: str | Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``, in order. A last line cut short (a run killed while
    writing it, which ``--resume`` drops too) is left out; a bad line anywhere else is an error."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run} a minids run directory?)")
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not text.endswith("\n"):
                break  # cut short mid-write
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({e.msg}); mend or delete that line") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}, line {i + 1}: a {type(rec).__name__}, not a record; mend or delete that line")
        if isinstance(rec.get("tokens"), bool) or not isinstance(rec.get("tokens"), (int, float)):
            raise ValueError(f"{path}, line {i + 1}: a record needs its number of 'tokens' (minids train writes it); "
                             "mend or delete that line")
        rows.append(rec)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    """x in millions of tokens, y the metric."""
    pts = [(r["tokens"] / 1e6, r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, path: Path) -> None:
    with written_whole(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def plot_run(run: str | Path) -> list[Path]:
    """Write the run's PNGs; returns their paths. Raises PlotError when matplotlib is missing."""
    run = Path(run)
    rows = read_metrics(run)
    if not rows:
        raise ValueError(f"{run / 'metrics.jsonl'}: no records yet (a run logs its first after its first step)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plots need matplotlib: pip install 'minids[plots]'") from None
    written = []

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "train loss (nats/token)"), ("val_loss", "validation loss (nats/token)"),
                       ("mtp_loss", "MTP loss")):
        x, y = _series(rows, key)
        if x:
            ax[0].plot(x, y, label=label, marker="o" if key == "val_loss" else None, ms=3)
    ax[0].set_xlabel("tokens (millions)")
    ax[0].set_ylabel("nats / token")
    ax[0].legend()
    x, y = _series(rows, "val_bpb")
    if x:
        ax[1].plot(x, y, marker="o", ms=3, color="C1")
    ax[1].set_xlabel("tokens (millions)")
    ax[1].set_ylabel("validation bits per byte")
    fig.suptitle(run.name)
    fig.tight_layout()
    written.append(run / "loss.png")
    _save(fig, written[-1])
    plt.close(fig)

    x, y = _series(rows, "lr")
    if x:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.plot(x, y)
        ax.set_xlabel("tokens (millions)")
        ax.set_ylabel("learning rate")
        fig.tight_layout()
        written.append(run / "lr.png")
        _save(fig, written[-1])
        plt.close(fig)

    x, y = _series(rows, "maxvio_batch")
    xg, yg = _series(rows, "maxvio_global")
    if x or xg:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        if x:
            ax.plot(x, y, label="MaxVio_batch (mean over layers)", lw=0.8)
        if xg:
            ax.plot(xg, yg, label="MaxVio_global (validation)", marker="o", ms=3)
        ax.set_xlabel("tokens (millions)")
        ax.set_ylabel("MaxVio")
        ax.legend()
        fig.tight_layout()
        written.append(run / "maxvio.png")
        _save(fig, written[-1])
        plt.close(fig)

    load_file = run / "expert_load.json"
    if load_file.is_file():
        import numpy as np

        try:
            load = np.array(json.loads(load_file.read_text())["load"], dtype=float)  # (L, E)
            if load.ndim != 2 or not load.size:
                raise ValueError(f"load of shape {load.shape}, not (MoE layers, experts)")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{load_file}: not an expert-load record ({e}); delete it to plot the rest") from None
        rel = load / load.mean(axis=1, keepdims=True)
        fig, ax = plt.subplots(figsize=(max(5, 0.35 * rel.shape[1] + 2), 0.5 * rel.shape[0] + 1.5))
        im = ax.imshow(rel, cmap="coolwarm", vmin=0, vmax=2, aspect="auto")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title("validation load / balanced load")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        written.append(run / "expert_load.png")
        _save(fig, written[-1])
        plt.close(fig)
    return written
