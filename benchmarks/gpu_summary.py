"""The one table of gpu_suite.sh, from the JSON files its parts wrote and the status of each part.

Reads FOLDER/status.tsv (part, status, seconds, limit, detail; written by gpu_suite.sh) and each part's JSON
(train_sdpa.json, train_fa2.json, eval_speed.json, reference_style.json, grid.json); prints the table and writes
it as FOLDER/summary.md and FOLDER/summary.json. A part that failed, timed out or was skipped is one row saying
so. Standard library only: it runs even where the parts could not.

    python benchmarks/gpu_summary.py benchmarks/results/gpu_suite
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

# The parts in the order they run: (key, label, results file).
PARTS = [
    ("train_sdpa", "1 training, SDPA", "train_sdpa.json"),
    ("train_fa2", "1 training, FlashAttention 2", "train_fa2.json"),
    ("eval_speed", "2 evaluation", "eval_speed.json"),
    ("reference_style", "3 reference path", "reference_style.json"),
    ("grid", "4 SmolLM2 grid", "grid.json"),
]
COLUMNS = ["part", "setting", "result", "throughput", "status"]


def read_status(folder: Path) -> dict[str, dict[str, str]]:
    status = {}
    path = folder / "status.tsv"
    if path.is_file():
        for line in path.read_text().splitlines():
            part, state, seconds, limit, detail = (line.split("\t") + [""] * 5)[:5]
            status[part] = {"status": state, "seconds": seconds, "limit": limit, "detail": detail}
    return status


def number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.3g} %"


def training_rows(label: str, results: dict[str, Any]) -> list[dict[str, str]]:
    env = results["environment"]
    rows = []
    for r in results["rows"]:
        mfu = all(r.get(f"{kind}_mfu") is not None for kind in ("bitune", "baseline"))
        rows.append(
            {
                "part": label,
                "setting": f"{env['model_size']} Llama, {env['dtype']}, P={r['P']} T={r['T']}, batch "
                f"{r.get('batch_size', '?')}, checkpointing {'on' if r['checkpointing'] else 'off'}",
                "result": f"R = {r['R_baseline']:.3f} vs baseline (B = {r['B']:.3f}, R/B = "
                f"{r['R_baseline_over_B']:.2f}); {r['R_stock']:.3f} vs stock (R/B = {r['R_stock_over_B']:.2f})",
                "throughput": "; ".join(
                    f"{kind} {number(r[f'{kind}_tokens_per_s'])} tok/s"
                    + (f", MFU {percent(r.get(f'{kind}_mfu'))}" if mfu else "")
                    for kind in ("bitune", "baseline", "stock")
                ),
            }
        )
    return rows


def eval_rows(label: str, results: dict[str, Any]) -> list[dict[str, str]]:
    env = results["environment"]
    return [
        {
            "part": label,
            "setting": f"{r['task']}, {r['questions']} 4-option questions, batch {results.get('batch_size_questions', '?')}, "
            f"{env['model_size']} Llama, {env['dtype']}",
            "result": f"ours {r['ours_ratio']:.2f}x stock lm-eval `hf`; Bitune model {r['bitune_ratio']:.2f}x; "
            f"max |Δ log-lik| {r['ours_max_abs_diff']:.1g}",
            "throughput": f"questions/s: lm-eval {number(r['lm-eval_q_per_s'])}, ours {number(r['ours_q_per_s'])}, "
            f"Bitune {number(r['bitune_q_per_s'])}",
        }
        for r in results["rows"]
    ]


def reference_rows(label: str, results: dict[str, Any]) -> list[dict[str, str]]:
    env = results["environment"]
    return [
        {
            "part": label,
            "setting": f"P={r['P']} T={r['T']}, batch {r.get('batch_size', '?')}, {env['model_size']} Llama, "
            f"{env['dtype']}, reference {results.get('reference_attention', '?')} attention",
            "result": f"speed-up {r['speedup']:.2f}x ({r['speedup_over_sized_masks']:.2f}x over sequence-sized "
            f"masks; masks {r['full_size_mask_cost']:.2f} · fast path {r['fast_path_gain']:.2f} · batching "
            f"{r['batching_gain']:.2f})",
            "throughput": f"samples/s: Bitune {number(r['bitune_samples_per_s'])}, reference "
            f"{number(r['reference_style_samples_per_s'])}",
        }
        for r in results["rows"]
    ]


def grid_rows(label: str, results: dict[str, Any]) -> list[dict[str, str]]:
    setting = (
        f"{results['model']}, {results['steps']} steps x batch {results['batch_size']}, {results['precision']}, "
        f"ARC-Easy test[:{results['eval_limit']}] (full format)"
    )
    rows = []
    if results.get("base"):
        accuracy = results["base"]["accuracy"]
        rows.append(
            {
                "part": label,
                "setting": f"{setting}; untuned",
                "result": ", ".join(f"{task} acc {value:.3f}" for task, value in accuracy.items()),
                "throughput": "",
            }
        )
    comparisons = {c["method"]: c for c in results.get("comparisons", [])}
    for method in results["methods"]:
        cells = [c for c in results["cells"] if c["method"] == method]
        if not cells:
            rows.append({"part": label, "setting": f"{setting}; {method}", "result": "not reached"})
            continue
        tasks = list(cells[0]["accuracy"])
        result = []
        for task in tasks:
            values = [c["accuracy"][task] for c in cells]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            result.append(f"{task} acc {statistics.mean(values):.3f}{spread}")
        comparison = comparisons.get(method)
        if comparison:
            entry = comparison.get("average") or next(v for v in comparison.values() if isinstance(v, dict))
            result.append(
                f"{entry['difference']:+.3f} vs {comparison['reference']} (paired p = {entry['p_value']:.2g})"
            )
        speeds = [c["train_tokens_per_s"] for c in cells if c.get("train_tokens_per_s")]
        seeds = ", ".join(str(c["seed"]) for c in cells)
        reused = [c["name"] for c in cells if c.get("outcome") != "trained"]
        rows.append(
            {
                "part": label,
                "setting": f"{setting}; {method}, seed{'s' if len(cells) > 1 else ''} {seeds}"
                + (f" (reused: {', '.join(reused)})" if reused else ""),
                "result": "; ".join(result),
                "throughput": f"{number(statistics.mean(speeds))} training tok/s" if speeds else "n/a",
            }
        )
    return rows


BUILDERS = {
    "train_sdpa": training_rows,
    "train_fa2": training_rows,
    "eval_speed": eval_rows,
    "reference_style": reference_rows,
    "grid": grid_rows,
}


def summarize(folder: Path) -> dict[str, Any]:
    status = read_status(folder)
    rows: list[dict[str, str]] = []
    parts: dict[str, Any] = {}
    environment: dict[str, Any] = {}
    mfu_definition = None
    for key, label, filename in PARTS:
        state = status.get(key, {"status": "not run", "seconds": "", "limit": "", "detail": ""})
        parts[key] = state
        if state["status"] == "skipped":
            rows.append({"part": label, "status": f"skipped: {state['detail']}"})
            continue
        path = folder / filename
        text = state["status"] + (f" in {state['seconds']} s" if state["seconds"] else "")
        if state["status"] == "timed out":
            text = f"timed out after {state['limit']} s"
        if state["status"] not in ("ok", "timed out") and state["detail"]:
            text += f": {state['detail']}"
        if not path.is_file():
            rows.append({"part": label, "result": "no results", "status": text})
            continue
        try:
            results = json.loads(path.read_text())
            if key == "grid" and not results.get("complete"):
                text += f" (partial: {len(results['cells'])} of {len(results['methods']) * len(results['seeds'])} cells)"
            new_rows = BUILDERS[key](label, results)
        except (KeyError, TypeError, ValueError, StopIteration) as error:
            rows.append({"part": label, "result": f"unreadable {filename}: {error!r}", "status": text})
            continue
        for row in new_rows:
            row["status"] = text
        rows.extend(new_rows)
        if "environment" in results and not environment:
            environment = results["environment"]
        mfu_definition = mfu_definition or results.get("mfu_definition")
        if key.startswith("train") and results.get("peak_flops"):
            parts[key]["peak_flops"] = results["peak_flops"]
            parts[key]["peak_flops_source"] = results.get("peak_flops_source")
    notes = []
    if environment:
        notes.append(
            f"device: {environment.get('gpu') or environment.get('device')}, torch {environment.get('torch')}"
        )
    peaks = {(p["peak_flops"], p["peak_flops_source"]) for p in parts.values() if p.get("peak_flops")}
    if mfu_definition:
        peak = ", ".join(f"{value:.3g} FLOP/s ({source})" for value, source in peaks) or "unknown"
        notes.append(f"MFU = {mfu_definition}; peak {peak}")
    notes.append(
        "R = Bitune samples/s ÷ baseline samples/s; B = (P+T)/(2P+T−1), the cost of one extra prompt pass"
    )
    return {"rows": rows, "parts": parts, "notes": notes}


def markdown(summary: dict[str, Any]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in COLUMNS) + " |" for row in summary["rows"]]
    return "\n".join(["# gpu_suite.sh", "", *lines, "", *(f"- {note}" for note in summary["notes"])]) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="gpu_suite.sh's results folder")
    args = parser.parse_args(argv)
    summary = summarize(args.folder)
    text = markdown(summary)
    (args.folder / "summary.md").write_text(text)
    (args.folder / "summary.json").write_text(json.dumps(summary, indent=2))
    print(text)
    print(f"wrote {args.folder / 'summary.md'} and {args.folder / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
