"""Tables, files and plots of evaluation results, in the original's per-task column order."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

# Column orders of the original's eval_existingOnes.py, per task ("Others" for any other task).
TASK_COLUMNS = {
    "DIS5K": ["maxFm", "wFmeasure", "MAE", "Smeasure", "meanEm", "HCE", "maxEm", "meanFm", "adpEm", "adpFm",
              "mBA", "maxBIoU", "meanBIoU"],
    "COD": ["Smeasure", "wFmeasure", "meanFm", "meanEm", "maxEm", "MAE", "maxFm", "adpEm", "adpFm", "HCE",
            "mBA", "maxBIoU", "meanBIoU"],
    "HRSOD": ["Smeasure", "maxFm", "meanEm", "MAE", "maxEm", "meanFm", "wFmeasure", "adpEm", "adpFm", "HCE",
              "mBA", "maxBIoU", "meanBIoU"],
    "General": ["maxFm", "wFmeasure", "MAE", "Smeasure", "meanEm", "HCE", "maxEm", "meanFm", "adpEm", "adpFm",
                "mBA", "maxBIoU", "meanBIoU"],
    "General-2K": ["maxFm", "wFmeasure", "MAE", "Smeasure", "meanEm", "HCE", "maxEm", "meanFm", "adpEm",
                   "adpFm", "mBA", "maxBIoU", "meanBIoU"],
    "Matting": ["Smeasure", "maxFm", "meanEm", "MSE", "maxEm", "meanFm", "wFmeasure", "adpEm", "adpFm", "HCE",
                "mBA", "maxBIoU", "meanBIoU"],
    "Others": ["Smeasure", "MAE", "maxEm", "meanEm", "maxFm", "meanFm", "wFmeasure", "adpEm", "adpFm", "HCE",
               "mBA", "maxBIoU", "meanBIoU"],
}

# Column name -> key of Evaluator.results().
COLUMN_KEYS = {
    "maxFm": "maxF", "meanFm": "meanF", "adpFm": "F_adp",
    "maxEm": "maxE", "meanEm": "meanE", "adpEm": "E_adp",
    "Smeasure": "S", "wFmeasure": "wF", "MAE": "MAE", "MSE": "MSE", "HCE": "HCE", "mBA": "MBA",
    "maxBIoU": "maxBIoU", "meanBIoU": "meanBIoU",
}


def columns_for(task: str) -> list[str]:
    """The metric columns of ``task``, in the original's order."""
    return list(TASK_COLUMNS.get(task, TASK_COLUMNS["Others"]))


def _cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column == "HCE":
        return str(int(round(value)))
    if column == "MSE":
        return f"{value:.5f}"
    text = f"{value:.3f}"
    return text[1:] if text.startswith("0.") else text  # ".873", as the original prints


def table_rows(rows: list[tuple[str, str, dict]], task: str) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells for (dataset, method, results) rows."""
    columns = columns_for(task)
    header = ["Dataset", "Method", *columns]
    cells = [[d, m, *(_cell(c, res.get(COLUMN_KEYS[c])) for c in columns)] for d, m, res in rows]
    return header, cells


def format_table(rows: list[tuple[str, str, dict]], task: str) -> str:
    """A plain-text table of (dataset, method, results) rows."""
    header, cells = table_rows(rows, task)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells, strict=True)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(row):
        return "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) + " |"

    return "\n".join([line, fmt(header), line, *(fmt(r) for r in cells), line])


def _plain(value):
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, float | np.floating):
        value = float(value)
        return None if math.isnan(value) else value
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str, rows: list[tuple[str, str, dict]], task: str) -> None:
    """{"results": {dataset: {method: results}}} at full precision, curves included; NaN is written as null."""
    out: dict = {"task": task, "columns": columns_for(task), "results": {}}
    for dataset, method, res in rows:
        out["results"].setdefault(dataset, {})[method] = {k: _plain(v) for k, v in res.items()}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def write_csv(path: str, rows: list[tuple[str, str, dict]], task: str) -> None:
    """One row per (dataset, method), the task's columns at full precision."""
    columns = columns_for(task)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Dataset", "Method", *columns, "count"])
        for dataset, method, res in rows:
            values = [_plain(res.get(COLUMN_KEYS[c])) for c in columns]
            writer.writerow([dataset, method, *("" if v is None else v for v in values), res.get("count", "")])


def write_per_image_csv(path: str, records: list[dict]) -> None:
    """One row per image: its name and scalar metrics."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in records:
            writer.writerow({k: _plain(v) for k, v in r.items()})


def plot_curves(path_prefix: str, dataset: str, curves: dict[str, dict]) -> list[str]:
    """Precision-recall and F-measure-per-threshold plots (PNG) of each method on one data set.

    Args:
      path_prefix: files are written as ``{path_prefix}_pr.png`` and ``{path_prefix}_fm.png``.
      curves: method -> results holding ``precision``, ``recall`` and ``F_curve``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = np.arange(255, -1, -1)  # curve entry i is threshold 255 - i
    written = []
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    for method, res in curves.items():
        if res.get("precision") is not None:
            ax.plot(res["recall"], res["precision"], label=method, lw=1.5)
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.02), title=f"{dataset}: PR curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(f"{path_prefix}_pr.png")
    plt.close(fig)
    written.append(f"{path_prefix}_pr.png")

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, res in curves.items():
        if res.get("F_curve") is not None:
            ax.plot(thresholds, res["F_curve"], label=method, lw=1.5)
    ax.set(xlabel="Threshold", ylabel=r"F-measure ($\beta^2$ = 0.3)", xlim=(0, 255), ylim=(0, 1.02),
           title=f"{dataset}: F-measure curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(f"{path_prefix}_fm.png")
    plt.close(fig)
    written.append(f"{path_prefix}_fm.png")
    return [os.fspath(p) for p in written]
