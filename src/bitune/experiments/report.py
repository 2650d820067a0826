"""The report of an experiment (`bitune experiment`): tables, a paired significance test and plots.

    bitune report runs/experiments/cpu-synthetic

reads the experiment folder and writes `OUT_DIR/report/` in one rename: `report.md` (Markdown, images
embedded), `summary.json` (the same numbers, for scripts) and PNG plots:

* `results.png` — every task's score and the average over tasks, per method: mean over seeds, error bars
  one standard deviation over seeds; one panel per PEFT kind;
* `loss_<peft>.png` — training loss and eval loss over the steps, per method (line: mean over seeds,
  band: lowest to highest seed);
* `alphas_<peft>.png` — the learned mixing coefficients α per layer, keys and values, per method that
  mixes (mean over seeds, error bars: standard deviation; 0.5 is where every α starts).

Each method is compared with the baseline (and Bitune with each ablation) by a paired test over the
evaluation items: every item's score is averaged over the seeds of each method, and the two-sided
sign-flip permutation test (`paired_permutation_test`) asks whether the per-item differences could be
symmetric around zero. For the average over tasks the items are weighted so that every task counts the same.

The experiment folder it reads is described in `bitune.experiments.layout`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bitune.errors import BituneInputError
from bitune.experiments.layout import (
    BASE_EVAL_FILE,
    CELLS_DIR,
    DONE_FILE,
    EVAL_FILE,
    EXPERIMENT_FILE,
    METRICS_FILE,
    REPORT_DIR,
    cell_name,
)
from bitune.files import atomic_directory

BASELINE = "baseline"
FULL_METHOD = "bitune"
UNTUNED = "base model (untuned)"
# Up to this many non-zero differences every sign pattern is enumerated (2^16 rows); beyond, a random sample.
EXACT_TEST_LIMIT = 16
RESAMPLES = 10_000
SIGNIFICANCE = 0.05


# ---------------------------------------------------------------------------------------------- statistics


def paired_permutation_test(
    differences: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0
) -> float:
    """Two-sided p-value that paired differences are symmetric around zero (sign-flip permutation test).

    The statistic is |sum of differences|; under the null hypothesis every difference is as likely to have
    the opposite sign. Zero differences carry no information and are dropped. With at most
    `EXACT_TEST_LIMIT` non-zero differences all sign patterns are enumerated (an exact p-value); otherwise
    `resamples` random patterns give (count + 1) / (resamples + 1), which never underestimates it.
    Weighted statistics (the average over tasks) come in as pre-multiplied differences.

    Example:
        >>> paired_permutation_test([1, 1, 1, 1, 1])  # 2 of the 32 sign patterns reach |sum| = 5
        0.0625
        >>> paired_permutation_test([0.5, -0.5, 0.0])
        1.0
    """
    values = np.asarray(differences, dtype=np.float64)
    values = values[values != 0]
    if values.size == 0:
        return 1.0
    observed = abs(values.sum())
    threshold = observed - 1e-9 * max(1.0, observed)  # equal sums must count despite rounding
    if values.size <= EXACT_TEST_LIMIT:
        patterns = np.arange(2**values.size)[:, None] >> np.arange(values.size) & 1
        sums = np.abs((2 * patterns - 1) @ values)
        return float(np.mean(sums >= threshold))
    rng = np.random.default_rng(seed)
    reached, remaining = 0, resamples
    while remaining:  # in chunks: resamples x items signs can be large
        chunk = min(remaining, max(1, 2**22 // values.size))
        signs = rng.integers(0, 2, size=(chunk, values.size), dtype=np.int8) * 2 - 1
        reached += int(np.count_nonzero(np.abs(signs @ values) >= threshold))
        remaining -= chunk
    return (reached + 1) / (resamples + 1)


@dataclass
class Comparison:
    """One method against a reference on one task (or the average): the mean difference and its p-value."""

    difference: float
    p_value: float
    items: int


def compare(
    method_items: dict[str, np.ndarray], reference_items: dict[str, np.ndarray]
) -> dict[str, Comparison]:
    """Per task and for the average over tasks: mean per-item difference (method - reference) and p-value.

    Both arguments map task -> per-item scores already averaged over seeds (same items, same order).

    Example:
        >>> result = compare({"t": np.array([1.0, 1.0, 1.0, 1.0, 1.0])}, {"t": np.zeros(5)})
        >>> result["t"].difference, result["t"].p_value, result["average"].p_value
        (1.0, 0.0625, 0.0625)
    """
    tasks = [task for task in method_items if task in reference_items]
    result, weighted = {}, []
    for task in tasks:
        differences = method_items[task] - reference_items[task]
        result[task] = Comparison(
            float(differences.mean()), paired_permutation_test(differences), differences.size
        )
        weighted.append(differences / (differences.size * len(tasks)))
    if tasks:
        pooled = np.concatenate(weighted)
        result["average"] = Comparison(float(pooled.sum()), paired_permutation_test(pooled), pooled.size)
    return result


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class CellResult:
    """What one finished cell left behind."""

    method: str
    peft: str
    seed: int
    scores: dict[str, float]  # task -> primary metric
    items: dict[str, np.ndarray]  # task -> per-item primary metric
    item_ids: dict[str, list[str]]
    alphas: dict[str, list[float]]
    train_loss: list[tuple[int, float]]
    eval_loss: list[tuple[int, float]]
    alpha_curve: list[tuple[int, dict[str, list[float]]]]  # (step, α per layer for keys and values) as logged

    @property
    def average(self) -> float:
        return float(np.mean(list(self.scores.values())))


@dataclass
class Results:
    """Everything the report shows, read from an experiment folder."""

    experiment: dict[str, Any]
    tasks: list[str]
    metrics: dict[str, str]  # task -> its primary metric
    cells: list[CellResult]
    missing: list[str]  # cells of the grid that are not done
    untuned: dict[str, float] | None

    def methods(self, peft: str) -> list[str]:
        present = {cell.method for cell in self.cells if cell.peft == peft}
        return [method for method in self.experiment["grid"]["methods"] if method in present]

    def peft_kinds(self) -> list[str]:
        present = {cell.peft for cell in self.cells}
        return [kind for kind in self.experiment["grid"]["peft"] if kind in present]

    def select(self, method: str, peft: str) -> list[CellResult]:
        return [cell for cell in self.cells if cell.method == method and cell.peft == peft]

    def seed_averaged_items(self, method: str, peft: str) -> dict[str, np.ndarray]:
        cells = self.select(method, peft)
        return {task: np.mean([cell.items[task] for cell in cells], axis=0) for task in self.tasks}


def read_results(output_dir: str | Path) -> Results:
    """Read an experiment folder's finished cells (see the module docstring for the layout).

    Example:
        >>> results = read_results("runs/experiments/cpu-synthetic")  # doctest: +SKIP
        >>> [cell.average for cell in results.cells]  # doctest: +SKIP
    """
    output_dir = Path(output_dir)
    experiment = _read_json(output_dir / EXPERIMENT_FILE, "run `bitune experiment CONFIG.yaml` first")
    tasks = {task["name"]: task["metric"] for task in experiment["tasks"]}
    cells, missing = [], []
    for cell in experiment["cells"]:
        folder = output_dir / CELLS_DIR / cell["name"]
        if not (folder / DONE_FILE).is_file():
            missing.append(cell["name"])
            continue
        evaluation = _read_json(folder / EVAL_FILE, "rerun the experiment to evaluate this cell")
        scores, items, ids = {}, {}, {}
        for task, metric in tasks.items():
            entry = evaluation["tasks"].get(task)
            if entry is None:
                raise BituneInputError(
                    f"{folder / EVAL_FILE}: task {task!r} is missing; rerun the experiment"
                )
            scores[task] = entry["metrics"][metric]["value"]
            items[task] = np.asarray(entry["items"][metric], dtype=np.float64)
            ids[task] = entry["items"]["id"]
        train_loss, eval_loss, alpha_curve = _training_curves(folder / METRICS_FILE)
        cells.append(
            CellResult(
                cell["method"],
                cell["peft"],
                cell["seed"],
                scores,
                items,
                ids,
                evaluation.get("alphas", {}),
                train_loss,
                eval_loss,
                alpha_curve,
            )
        )
    _check_same_items(cells, output_dir)
    untuned = None
    if (output_dir / BASE_EVAL_FILE).is_file():
        base = _read_json(output_dir / BASE_EVAL_FILE, "")
        if all(task in base["tasks"] for task in tasks):
            untuned = {
                task: base["tasks"][task]["metrics"][metric]["value"] for task, metric in tasks.items()
            }
    return Results(experiment, list(tasks), tasks, cells, missing, untuned)


def _read_json(path: Path, advice: str) -> Any:
    if not path.is_file():
        raise BituneInputError(f"{path}: no such file; {advice}" if advice else f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BituneInputError(f"{path}: not valid JSON ({error})") from None


def _training_curves(path: Path) -> tuple[list, list, list]:
    """Training loss, eval loss and α per logged step, each as sorted (step, value) pairs."""
    train, evaluation, alphas = {}, {}, {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "loss" in record:
                train[record["step"]] = record["loss"]
            if "eval_loss" in record:
                evaluation[record["step"]] = record["eval_loss"]
            if record.get("alphas"):
                alphas[record["step"]] = record["alphas"]
    return sorted(train.items()), sorted(evaluation.items()), sorted(alphas.items())


def _check_same_items(cells: list[CellResult], output_dir: Path) -> None:
    """The paired test needs every cell scored on the same items."""
    if not cells:
        return
    first = cells[0]
    for cell in cells[1:]:
        for task, ids in cell.item_ids.items():
            if ids != first.item_ids[task]:
                raise BituneInputError(
                    f"{output_dir}: cells {cell_name(first.method, first.peft, first.seed)} and "
                    f"{cell_name(cell.method, cell.peft, cell.seed)} were scored on different {task!r} items; "
                    "rerun the experiment so that every cell is evaluated alike"
                )


# ---------------------------------------------------------------------------------------------- tables


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _mean_std(values: Sequence[float]) -> str:
    if len(values) < 2:
        return _percent(values[0])
    return f"{_percent(float(np.mean(values)))} ± {_percent(float(np.std(values, ddof=1)))}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(results: Results, peft: str) -> str:
    """Mean ± standard deviation over seeds (in %) per method, task and average over tasks."""
    header = ["method", *(f"{task} ({results.metrics[task]})" for task in results.tasks), "average", "seeds"]
    rows = []
    if results.untuned is not None:
        values = list(results.untuned.values())
        rows.append([UNTUNED, *(_percent(v) for v in values), _percent(float(np.mean(values))), "–"])
    for method in results.methods(peft):
        cells = results.select(method, peft)
        row = [f"**{method}**" if method == FULL_METHOD else method]
        row += [_mean_std([cell.scores[task] for cell in cells]) for task in results.tasks]
        row += [_mean_std([cell.average for cell in cells]), str(len(cells))]
        rows.append(row)
    return _markdown_table(header, rows)


def comparison_table(results: Results, peft: str, pairs: list[tuple[str, str]]) -> str:
    """Differences (method - reference, in percentage points) and p-values for each (method, reference)."""
    header = ["method", "vs", *results.tasks, "average"]
    rows = []
    for method, reference in pairs:
        comparison = compare(
            results.seed_averaged_items(method, peft), results.seed_averaged_items(reference, peft)
        )
        row = [method, reference]
        for column in [*results.tasks, "average"]:
            entry = comparison[column]
            mark = "*" if entry.p_value < SIGNIFICANCE else ""
            row.append(f"{100 * entry.difference:+.1f}{mark} (p={entry.p_value:.3g})")
        rows.append(row)
    return _markdown_table(header, rows)


def _pairs(results: Results, peft: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    methods = results.methods(peft)
    against_baseline = [(m, BASELINE) for m in methods if m != BASELINE] if BASELINE in methods else []
    ablations = [m for m in methods if m not in (BASELINE, FULL_METHOD)]
    against_ablations = [(FULL_METHOD, m) for m in ablations] if FULL_METHOD in methods else []
    return against_baseline, against_ablations


# ---------------------------------------------------------------------------------------------- plots


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    """One colour per method of the whole grid, so a method looks the same in every plot."""
    palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return {method: palette[index % len(palette)] for index, method in enumerate(methods)}


def _save(figure: Figure, folder: Path, name: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    (folder / name).write_bytes(buffer.getvalue())
    return name


def plot_results(results: Results, folder: Path, colors: dict[str, Any]) -> str:
    kinds = results.peft_kinds()
    columns = [*results.tasks, "average"]
    bars = len(columns) * (len(results.experiment["grid"]["methods"]) + 1)  # +1: the untuned model
    figure = Figure(figsize=(max(6.0, 0.4 * bars), 3.8 * len(kinds)))
    axes = figure.subplots(len(kinds), 1, squeeze=False)[:, 0]
    seeds = len(results.experiment["grid"]["seeds"])
    for axis, peft in zip(axes, kinds):
        methods = results.methods(peft)
        entries = ([(UNTUNED, None)] if results.untuned is not None else []) + [(m, m) for m in methods]
        width = 0.8 / len(entries)
        positions = np.arange(len(columns))
        for index, (label, method) in enumerate(entries):
            if method is None:
                values = [*results.untuned.values(), float(np.mean(list(results.untuned.values())))]
                means, errors = np.array(values), None
                style = {"color": "lightgray", "hatch": "//", "edgecolor": "gray"}
            else:
                cells = results.select(method, peft)
                per_seed = np.array([[*(c.scores[t] for t in results.tasks), c.average] for c in cells])
                means = per_seed.mean(axis=0)
                errors = 100 * per_seed.std(axis=0, ddof=1) if len(cells) > 1 else None
                style = {"color": colors[method]}
            offset = positions - 0.4 + width * (index + 0.5)
            axis.bar(offset, 100 * means, width, yerr=errors, capsize=2, label=label, **style)
        axis.set_xticks(positions, [f"{t}\n({results.metrics[t]})" for t in results.tasks] + ["average"])
        axis.set_ylabel("score (%)")
        axis.set_title(f"{peft}: score per task, mean ± std over {seeds} seed{'s' * (seeds > 1)}")
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize="small", ncols=min(4, len(entries)), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(figure, folder, "results.png")


def plot_losses(results: Results, peft: str, folder: Path, colors: dict[str, Any]) -> str:
    figure = Figure(figsize=(11, 4), layout="constrained")
    figure.suptitle("line: mean over seeds; band: lowest to highest seed", fontsize="small")
    axes = figure.subplots(1, 2)
    for axis, kind, title in ((axes[0], "train_loss", "training loss"), (axes[1], "eval_loss", "eval loss")):
        drawn = False
        for method in results.methods(peft):
            curves = [dict(getattr(cell, kind)) for cell in results.select(method, peft)]
            steps = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
            if not steps:
                continue
            values = np.array([[curve[step] for step in steps] for curve in curves])
            axis.plot(
                steps,
                values.mean(axis=0),
                color=colors[method],
                label=method,
                marker="." if len(steps) < 20 else None,
            )
            if len(curves) > 1:
                axis.fill_between(
                    steps, values.min(axis=0), values.max(axis=0), color=colors[method], alpha=0.15
                )
            drawn = True
        axis.set_title(f"{peft}: {title}")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("cross-entropy per answer token")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.ticklabel_format(axis="y", useOffset=False)
        axis.grid(alpha=0.3)
        if drawn:
            axis.legend(fontsize="small")
        else:
            axis.text(
                0.5,
                0.5,
                f"no {title} logged\n(eval loss: set validation and training.eval_steps)",
                ha="center",
                va="center",
                transform=axis.transAxes,
            )
    return _save(figure, folder, f"loss_{peft}.png")


def plot_alphas(results: Results, peft: str, folder: Path, colors: dict[str, Any]) -> str | None:
    mixing = [m for m in results.methods(peft) if all(c.alphas for c in results.select(m, peft))]
    if not mixing:
        return None
    figure = Figure(figsize=(11, 4))
    axes = figure.subplots(1, 2, sharey=True)
    for axis, kind in zip(axes, ("keys", "values")):
        for method in mixing:
            values = np.array([cell.alphas[kind] for cell in results.select(method, peft)])
            layers = np.arange(values.shape[1])
            errors = values.std(axis=0, ddof=1) if len(values) > 1 else None
            axis.errorbar(
                layers,
                values.mean(axis=0),
                yerr=errors,
                color=colors[method],
                label=method,
                marker="o",
                capsize=3,
            )
        axis.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="start (0.5)")
        axis.set_title(f"{peft}: learned α per layer, {kind}")
        axis.set_xlabel("layer")
        axis.set_ylabel("α (weight of the second prompt pass)")
        axis.set_xticks(layers)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    return _save(figure, folder, f"alphas_{peft}.png")


def plot_alpha_trajectories(results: Results, peft: str, folder: Path) -> str | None:
    """α of every layer over training for the full method: where and how fast the mixing settles."""
    cells = [cell for cell in results.select("bitune", peft) if cell.alpha_curve]
    if not cells:
        return None
    figure = Figure(figsize=(11, 4))
    figure.suptitle("one line per layer and seed", fontsize="small")
    axes = figure.subplots(1, 2, sharey=True)
    layers = len(cells[0].alpha_curve[0][1]["keys"])
    palette = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, layers))
    for axis, kind in zip(axes, ("keys", "values")):
        for cell in cells:
            steps = [step for step, _ in cell.alpha_curve]
            values = np.array([alphas[kind] for _, alphas in cell.alpha_curve])
            for layer in range(layers):
                label = f"layer {layer}" if cell is cells[0] else None
                axis.plot(
                    steps, values[:, layer], color=palette[layer], alpha=0.8, linewidth=1.2, label=label
                )
        axis.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        axis.set_title(f"{peft}: bitune α of the {kind} during training")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("α (weight of the bidirectional pass)")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small", ncol=2)
    return _save(figure, folder, f"alpha_trajectories_{peft}.png")


# ---------------------------------------------------------------------------------------------- report


def write_report(output_dir: str | Path) -> Path:
    """Write `output_dir/report/` (report.md, summary.json, PNG plots) from the finished cells; returns report.md.

    Example:
        >>> write_report("runs/experiments/cpu-synthetic")  # doctest: +SKIP
        PosixPath('runs/experiments/cpu-synthetic/report/report.md')
    """
    output_dir = Path(output_dir)
    results = read_results(output_dir)
    if not results.cells:
        raise BituneInputError(f"{output_dir}: no finished cells yet; run `bitune experiment` first")
    colors = _colors(results.experiment["grid"]["methods"])
    target = output_dir / REPORT_DIR
    with atomic_directory(target) as folder:
        sections = [_header(results, output_dir)]
        sections.append(
            f"## Results\n\n![scores per task and method]({plot_results(results, folder, colors)})"
        )
        summary: dict[str, Any] = {"tasks": results.metrics, "missing_cells": results.missing, "peft": {}}
        for peft in results.peft_kinds():
            against_baseline, against_ablations = _pairs(results, peft)
            sections.append(f"### {peft}: score (%), mean ± std over seeds\n\n{results_table(results, peft)}")
            if against_baseline:
                sections.append(
                    f"### {peft}: difference to the baseline (percentage points)\n\n"
                    f"{comparison_table(results, peft, against_baseline)}"
                )
            if against_ablations:
                sections.append(
                    f"### {peft}: Bitune against each ablation (percentage points)\n\n"
                    f"{comparison_table(results, peft, against_ablations)}"
                )
            sections.append(
                f"### {peft}: loss curves\n\n![loss curves]({plot_losses(results, peft, folder, colors)})"
            )
            alphas = plot_alphas(results, peft, folder, colors)
            if alphas is not None:
                sections.append(f"### {peft}: mixing coefficients\n\n![alpha per layer]({alphas})")
            trajectories = plot_alpha_trajectories(results, peft, folder)
            if trajectories is not None:
                sections.append(f"![alpha during training]({trajectories})")
            summary["peft"][peft] = _summary(results, peft, against_baseline + against_ablations)
        sections.append(_method_note(results))
        (folder / "report.md").write_text("\n\n".join(sections) + "\n", encoding="utf-8")
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return target / "report.md"


def _header(results: Results, output_dir: Path) -> str:
    experiment = results.experiment
    settings = experiment.get("summary", [])
    grid = experiment["grid"]
    lines = [
        f"# Experiment report: {output_dir.name}",
        "",
        f"Config: `{experiment.get('source', '?')}`. Every cell trains the same base model on the same data with the "
        "same steps and learning rate, and is evaluated alike.",
        "",
        *(f"- {key}: {value}" for key, value in settings),
        f"- grid: methods {', '.join(grid['methods'])}; PEFT {', '.join(grid['peft'])}; seeds "
        f"{', '.join(map(str, grid['seeds']))}",
        f"- finished cells: {len(results.cells)} of {len(experiment['cells'])}",
    ]
    if results.missing:
        lines.append(f"- not finished (left out below): {', '.join(results.missing)}")
    return "\n".join(lines)


def _method_note(results: Results) -> str:
    return (
        "## How to read this\n\n"
        'Scores are in %, the primary metric of each task (in brackets). "mean ± std" is over seeds (sample '
        "standard deviation). Differences are in percentage points; p is the two-sided p-value of a paired "
        "sign-flip permutation test over the evaluation items, each item's score averaged over the seeds of each "
        f"method (exact up to {EXACT_TEST_LIMIT} differing items, else {RESAMPLES:,} random sign flips); for the "
        f"average, items are weighted so that every task counts the same. * marks p < {SIGNIFICANCE}. The test "
        "treats the items as the random sample; it does not account for the variation between seeds beyond "
        "averaging over them."
    )


def _summary(results: Results, peft: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    methods = {}
    for method in results.methods(peft):
        cells = results.select(method, peft)
        methods[method] = {
            "seeds": [cell.seed for cell in cells],
            "scores": {task: [cell.scores[task] for cell in cells] for task in results.tasks},
            "average": [cell.average for cell in cells],
        }
    comparisons = []
    for method, reference in pairs:
        comparison = compare(
            results.seed_averaged_items(method, peft), results.seed_averaged_items(reference, peft)
        )
        comparisons.append(
            {
                "method": method,
                "reference": reference,
                **{
                    task: {"difference": c.difference, "p_value": c.p_value} for task, c in comparison.items()
                },
            }
        )
    return {"methods": methods, "comparisons": comparisons}


__all__ = [
    "CellResult",
    "Comparison",
    "Results",
    "compare",
    "paired_permutation_test",
    "read_results",
    "write_report",
]
