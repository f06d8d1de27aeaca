"""The report of a comparison of finished runs, from their ``summary.json`` and ``metrics.jsonl`` files.

Pure functions (no training, no model): ``samlm compare`` and ``samlm demo`` call
:func:`write_report`, and the pieces are usable on their own::

    runs = [load_run(d) for d in run_dirs]
    rows = aggregate(runs)                 # one row per (optimizer, rho, lr): mean ± std over seeds
    print(markdown_table(rows))
    print(tuned_table(runs))               # each method's best (lr, rho) on the tuning slice, on the report slice

The runs and their aggregation over seeds live in :mod:`samlm.studies.runs`, the numbers' rules in
:mod:`samlm.studies.stats` (mean ± the *sample* standard deviation, n − 1 in the denominator;
differences paired by seed), the plots in :mod:`samlm.studies.plots` and the robustness section in
:mod:`samlm.studies.robustness_report`; the tables are here. Every file is written atomically.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from samlm import io
from samlm.optim.registry import METHODS
from samlm.studies import clock, report_checks, robustness_report
from samlm.studies.grid import budget_headers, method_cost, parse_method, start_fraction
from samlm.studies.plots import write_plots
from samlm.studies.report_checks import every_run
from samlm.studies.runs import (
    COLUMNS,
    REFERENCE_OPTIMIZER,
    REPORT_KEY,
    TUNING_KEY,
    Column,
    Row,
    Run,
    aggregate,
    distinct,
    group_runs,
    point_cells,
    seed_values,
    several_lrs,
    step_time,
    step_time_outliers,
    tuned_point,
    typical_step_time,
)
from samlm.studies.runs import load_run as load_run  # re-exported: the docstring's report.load_run
from samlm.studies.stats import (
    Stat,
    csv_text,
    edge_mark,
    format_delta,
    format_interval,
    format_mean_std,
    mean_std,
    paired_delta,
    value_text,
    verdict,
)

REPORT_FILE = "report.md"
RESULTS_FILE = "results.csv"
DELTA_HEADER = "Δ val loss vs adamw (paired)"
INTERVAL_HEADER = "95% CI"
VERDICT_HEADER = "verdict"
CLOCK_NOTE = (
    "Two budgets equalise compute here. **Equal compute (model)** counts passes (the FLOP model above; it "
    "transfers across machines). **Equal compute (clock)** gives every method the steps whose *measured* time "
    "on this machine equals the costliest method's, from the calibration below: it is the one this report calls "
    "equal compute, since the model leaves out what a step costs beyond its passes."
)

CSV_FIELDS = (
    "run",
    "optimizer",
    "rho",
    "lr",
    "seed",
    "completed",
    "step",
    "steps",
    "val_loss",
    "val_ppl",
    "report_loss",
    "report_ppl",
    "best_val_loss",
    "best_val_loss_step",
    "train_loss",
    "hessian_lambda_max",
    "gauss_newton_lambda_max",
    "functional_lambda",
    "preconditioned_lambda_max",
    "logit_path_norm",
    "functional_path_norm",
    "logit_functional_ratio",
    "step_s",
    "tokens_per_s",
    "train_seconds",
    "wall_seconds",
    "tokens",
    "params",
    "non_embedding_params",
    "nonfinite_steps",
)


def results_csv(runs: Sequence[Run], budgets: Mapping[str, Sequence[Run]] | None = None) -> str:
    """One line per run with its headline numbers (CSV text); ``budget``: the comparisons a run
    belongs to (equal steps, equal compute, or both)."""
    robust: list[str] = []
    if robustness_report.measured(runs):  # --robustness: each σ's, int8's, int4's Δloss and the forgetting
        level = robustness_report.matched_level(runs)  # x*, matched over every run in the file
        runs = [robustness_report.flatten(r, level) for r in runs]
        robust = [f"robust_noise_{s:g}" for s in robustness_report.sigmas(runs)] + ["robust_int8", "robust_int4"]
        if level is not None:
            robust += [robustness_report.FORGET_KEY, "robust_forgetting_level"]
            runs = [replace(r, summary={**r.summary, "robust_forgetting_level": level}) for r in runs]
    fields = (*CSV_FIELDS, *robust)
    slow = {o.run for o in step_time_outliers(runs)}
    rows = []
    for run in runs:
        kinds = [kind for kind, group in (budgets or {}).items() if any(r.name == run.name for r in group)]
        timing = step_time(run)
        rows.append(
            [
                run.name,
                *(run.summary.get(key) for key in fields[1:]),
                "+".join(kinds) or "steps",
                timing.seconds,
                timing.source,
                run.name in slow,
                run.method,
            ]
        )
    # step_time_s: the run's median step time (samlm.studies.runs.step_time), step_s its mean; method:
    # the optimizer, or its variant in the comparison (sam@every5), what the tables group by
    return csv_text((*fields, "budget", "step_time_s", "step_time_from", "step_time_outlier", "method"), rows)


def _table_cells(rows: Sequence[Row], columns: Sequence[Column]) -> tuple[list[str], list[list[str]], int]:
    with_delta = any(r.is_reference for r in rows)
    with_lr = several_lrs((r.optimizer, r.rho, r.lr) for r in rows)
    headers = ["optimizer", "ρ"] + ["lr"] * with_lr + ["seeds"] + [c.header for c in columns[:1]]
    headers += [DELTA_HEADER, INTERVAL_HEADER, VERDICT_HEADER] if with_delta else []
    headers += [c.header for c in columns[1:]]
    body = []
    for row in rows:
        cells = point_cells((row.optimizer, row.rho, row.lr), with_lr) + [str(row.n), row.cell(columns[0])]
        cells += [row.delta_cell(), row.interval_cell(), row.verdict_cell()] if with_delta else []
        cells += [row.cell(c) for c in columns[1:]]
        body.append(cells)
    return headers, body, 3 + with_lr


def markdown_table(rows: Sequence[Row], columns: Sequence[Column] = COLUMNS) -> str:
    """The aggregated table in Markdown (a Δ-to-AdamW column when AdamW is among the rows)."""
    headers, body, text_columns = _table_cells(rows, columns)
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] * text_columns + ["---:"] * (len(headers) - text_columns)) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def text_table(rows: Sequence[Row], columns: Sequence[Column] = COLUMNS) -> str:
    """The same table aligned for a terminal."""
    headers, body, text_columns = _table_cells(rows, columns)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    fmt_line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([fmt_line(headers)] + [fmt_line(r) for r in body])


def describe_setup(summary: Mapping[str, Any], several_lrs: bool = False) -> str:
    """One paragraph on the shared setup of a comparison, from one run's summary (missing fields: "?";
    ``several_lrs``: the runs differ in peak lr)."""
    config = summary.get("config", {}) or {}
    resolved = summary.get("resolved", {}) or {}

    def get(source: Mapping, key: str, fmt: str = "") -> str:
        value = source.get(key)
        if value is None:
            return "?"
        try:
            return format(value, fmt)
        except (TypeError, ValueError):
            return str(value)

    if config.get("model"):
        model = f"`{config['model']}`"
    else:
        model = f"{get(config, 'arch')} {get(config, 'layers')} layers × {get(config, 'width')} wide, {get(config, 'heads')} heads"
    parts = [
        f"Model: {model} ({get(resolved, 'params', ',')} parameters, {get(resolved, 'non_embedding_params', ',')} "
        "non-embedding)",
        f"data: `{get(config, 'data')}` ({get(resolved, 'tokenizer')} tokenizer, context {get(config, 'context')}, "
        f"{get(resolved, 'train_tokens', ',')} training / {get(resolved, 'val_tokens', ',')} validation tokens)",
        f"budget: {get(resolved, 'total_steps')} steps × {get(resolved, 'tokens_per_step')} tokens "
        f"(batch {get(config, 'batch')} × grad-accum {get(config, 'grad_accum')}), the same for every optimizer",
        ("peak lr per run (the lr column), AdamW" if several_lrs else f"AdamW peak lr {get(config, 'lr', 'g')},")
        + f" β=({', '.join(map(str, config.get('betas') or ('?', '?')))}), eps "
        f"{get(config, 'adam_eps', 'g')}, weight decay {get(config, 'weight_decay')}, {get(resolved, 'warmup_steps')} "
        f"warmup steps, then cosine to {get(config, 'min_lr_ratio')}× peak",
        f"SAM family: ascent on {get(config, 'ascent_fraction')} of each batch, m={get(config, 'm')}",
        f"machine: {summary.get('machine', '?')}, torch {summary.get('torch_version', '?')} on {summary.get('device', '?')}",
    ]
    return "; ".join(parts) + "."


def delta_cells(delta: Stat) -> list[str]:
    """A paired Δ's three cells: mean ± std (n), its 95% interval and the verdict."""
    return [format_delta(delta), format_interval(delta), verdict(delta)]


def budget_table(
    budgets: Mapping[str, Sequence[Run]],
    reference: str = REFERENCE_OPTIMIZER,
    outliers: Iterable[str] | None = None,
    loss_key: str = "val_loss",
) -> str | None:
    """Markdown: each method's val-loss Δ to ``reference``, paired by seed, at equal steps and at
    equal compute (mean ± std over seed pairs and their number, the 95% interval, the verdict),
    beside the step cost the compute budget assumed and the step-time ratio measured (the medians
    of every run of each point, at either budget, the step-time ``outliers`` left out: by default
    :func:`samlm.studies.runs.step_time_outliers`). ``loss_key``: the loss compared (``report_loss``: the
    slice a tuned choice did not see). None without the reference."""
    groups = {kind: group_runs(runs) for kind, runs in budgets.items()}
    references = {kind: tuned_point(g, reference) for kind, g in groups.items()}
    if not any(references.values()):
        return None
    order = list(dict.fromkeys(key for g in groups.values() for key in g))
    with_lr = several_lrs(order)
    timing_kind = "steps" if "steps" in groups else "compute"
    all_runs = distinct(r for runs in budgets.values() for r in runs)
    every = group_runs(all_runs)
    skip = [o.run for o in step_time_outliers(all_runs)] if outliers is None else list(outliers)
    timing_reference = references[timing_kind]
    ref_step = typical_step_time(every.get(timing_reference, []), skip) if timing_reference else None
    headers = ["optimizer", "ρ"] + ["lr"] * with_lr + ["step cost (model)", "step time (measured)"]
    names = budget_headers(budgets)
    for kind in budgets:
        headers += [f"steps ({names[kind]})", names[kind], INTERVAL_HEADER, VERDICT_HEADER]
    lines = ["| " + " | ".join(headers) + " |", "|---|---|" + "---|" * with_lr + "---:|" * (len(headers) - 2 - with_lr)]
    for key in order:
        sample = next(g[key][0] for g in groups.values() if key in g)
        config = sample.summary.get("config", {})
        fraction = float(config.get("ascent_fraction", 0.25))
        # the schedule the run used: a SAM step every k-th step, plain steps before --sam-start
        start = start_fraction(float(config.get("sam_start") or 0), sample.summary.get("steps") or config.get("steps"))
        cost = (
            method_cost(key[0], fraction, sam_every=int(config.get("sam_every") or 1), sam_start_fraction=start)
            if parse_method(key[0])[0] in METHODS
            else None
        )
        step = typical_step_time(every.get(key, []), skip)
        measured = f"{step / ref_step:.2f}x" if step and ref_step else "n/a"
        cells = point_cells(key, with_lr) + ["n/a" if cost is None else f"{cost:.3g}x", measured]
        for kind, g in groups.items():
            members = g.get(key, [])
            steps = sorted({int(r.summary["steps"]) for r in members})
            cells.append(", ".join(map(str, steps)) or "–")
            reference_key = references[kind]
            if key == reference_key:
                cells += ["(reference)"] * 3
            elif not members or reference_key is None:
                cells += ["n/a"] * 3
            else:
                cells += delta_cells(
                    paired_delta(seed_values(members, loss_key), seed_values(g[reference_key], loss_key))
                )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def slices_text(summary: Mapping[str, Any]) -> str:
    """Which validation batches the tuning and the report slice are, from a run's ``resolved``."""
    resolved = summary.get("resolved") or {}
    tuning, held_out = resolved.get("tuning_batches"), resolved.get("report_batches")
    if not (tuning and held_out):
        return "the tuning slice (the validation batches val loss is measured on), reported on the report slice"
    return (
        f"the tuning slice (validation batches 1-{tuning}), reported on the report slice "
        f"(batches {tuning + 1}-{tuning + held_out})"
    )


def tuned_table(runs: Sequence[Run], reference: str = REFERENCE_OPTIMIZER) -> str | None:
    """Markdown: each method's (lr, ρ) point chosen by its mean val loss over seeds on the tuning
    slice (:func:`tuned_point`), with that choice's loss on the disjoint report slice and its
    difference to the tuned ``reference``'s at the same seed. None unless some method ran at more
    than one point."""
    groups = group_runs(runs)
    methods = list(dict.fromkeys(key[0] for key in groups))
    points = {m: sum(key[0] == m for key in groups) for m in methods}
    if max(points.values(), default=0) < 2:
        return None
    # every method has a point here: methods are read off the groups' keys
    chosen = {m: cast(tuple, tuned_point(groups, m)) for m in methods}
    reference_runs = groups[chosen[reference]] if reference in chosen else None
    headers = ["method", "points", "chosen lr", "chosen ρ", "seeds", "val loss (tuning slice)"]
    headers += ["report loss (report slice)", f"Δ report loss vs tuned {reference} (paired)"]
    headers += [INTERVAL_HEADER, VERDICT_HEADER]
    lines = ["| " + " | ".join(headers) + " |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method in methods:
        key, members = chosen[method], groups[chosen[method]]
        if reference_runs is None:
            delta = ["n/a"] * 3
        elif method == reference:
            delta = ["(reference)"] * 3
        else:
            delta = delta_cells(paired_delta(seed_values(members, REPORT_KEY), seed_values(reference_runs, REPORT_KEY)))
        swept = [k for k in groups if k[0] == method]
        cells = [
            method,
            str(points[method]),
            value_text(key[2]) + edge_mark(key[2], [k[2] for k in swept]),
            value_text(key[1]) + edge_mark(key[1], [k[1] for k in swept]),
            str(len(members)),
            format_mean_std(*mean_std(r.summary.get(TUNING_KEY) for r in members)[:2]),
            format_mean_std(*mean_std(r.summary.get(REPORT_KEY) for r in members)[:2]),
            *delta,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(
    runs: Sequence[Run],
    *,
    title: str = "samlm compare",
    notes: str = "",
    unfinished: Sequence[str] = (),
    plots: Sequence[str] = (),
    budgets: Mapping[str, Sequence[Run]] | None = None,
    calibration: Mapping[str, Any] | None = None,
    clock_steps: Mapping[str, Any] | None = None,
) -> str:
    """The report's Markdown; ``calibration``: the clock budget's (:mod:`samlm.studies.clock`), with
    the steps it gave each method (``clock_steps``)."""
    every = every_run(runs, budgets)
    outliers = step_time_outliers(every)
    rows = aggregate(runs, outliers=[o.run for o in outliers])
    lines = [f"# {title}", ""]
    if runs:
        lines += [describe_setup(runs[0].summary, several_lrs(r.group for r in runs)), ""]
        warned = report_checks.warnings(every, outliers)
        lines += ["Warnings:", "", *warned, ""] if warned else []
        config = runs[0].summary.get("config", {})
        sharp = runs[0].summary.get("sharpness") or {}
        lines += [
            "Mean ± sample standard deviation over seeds; **seeds** is the number of runs behind each row "
            "(one run: no ±). val loss/ppl: the final validation loss (nats per token) and perplexity on the "
            "tuning slice of the validation split; report loss: on the disjoint report slice after it; "
            "train loss: mean over the last evaluation window; " + report_checks.timing_note(every, outliers),
            "",
        ]
        if config.get("sharpness", True):
            lines += [
                f"Sharpness at the end of training, fp32, eval mode, on {config.get('sharpness_batches')} fixed "
                f"validation batch(es) of {config.get('sharpness_batch_size')} sequences: λ_max of the Hessian (H) "
                f"and of the Gauss-Newton matrix (GN) by Lanczos ({config.get('sharpness_iters')} iterations), "
                "λ_max(P⁻¹H) = λ_max(P^-1/2 H P^-1/2) with P = √v̂ + eps from each run's own Adam/Adafactor state "
                "(Cohen et al. 2022's preconditioned sharpness; n/a for SGD; for Muon's matrices P⁻¹ is its "
                "Newton–Schulz map frozen at the momentum, docs/optimizers.md), and "
                f"logit/func = ‖δ_logit‖/‖δ_func‖, the two paths of SAM's gradient change at "
                f"ρ={sharp.get('rho', config.get('sharpness_rho'))} (the same ρ for every optimizer).",
                "",
            ]
        if any(r.is_reference for r in rows):
            tuned = (
                "; AdamW ran at several learning rates: its point with the lowest mean val loss is the reference"
                if sum(r.optimizer == REFERENCE_OPTIMIZER for r in rows) > 1
                else ""
            )
            lines += [
                f"{DELTA_HEADER}: mean ± std over seeds of (val loss − AdamW's val loss at the same seed{tuned}). "
                "The seed fixes the initial weights and the order of the training batches for every optimizer, so "
                f"this paired difference is free of most seed-to-seed variation. {INTERVAL_HEADER}: the Student-t "
                "95% interval of the mean difference, mean ± t(0.975, n − 1)·std/√n over the n seed pairs (none "
                f"with one pair). {VERDICT_HEADER}: **ahead** (lower loss) or **behind** AdamW only when the "
                "interval excludes 0, **within noise** otherwise; with two seeds t is 12.7, so only a large, "
                "consistent difference decides.",
                "",
            ]
        lines += [markdown_table(rows), ""]
        lines += _tuned_section(budgets or {"steps": runs})
        kinds = set(budgets or {})
        compute = (
            budget_table(budgets, outliers=[o.run for o in outliers])
            if budgets and kinds & {"compute", "time"}
            else None
        )
        if compute is not None:
            lines += [
                "## Equal steps and equal compute",
                "",
                "Δ val loss vs AdamW, paired by seed (mean ± std over seed pairs, n = pairs; 95% CI and verdict as "
                "above). **Equal steps**: every "
                "method runs the same number of steps (the SAM family then spends more compute). **Equal compute**: "
                "every method gets the forward+backward compute of the costliest method in the comparison, so "
                "cheaper methods (AdamW first) run proportionally more steps, with their warmup, schedule and "
                "evaluation cadence stretched to their own length; one AdamW run per seed serves every method. "
                "Step cost (model): a step's passes over the batch counted with a backward as 2 forwards, relative "
                "to AdamW (SAM: + the ascent rows; Functional-SAM: + a forward of the other rows), from the method "
                "registry; step time (measured): the median step time of the method's runs (both budgets) over "
                "AdamW's, step-time outliers left out (wall clock, noisy "
                "on a shared machine; `samlm bench` measures it side by side).",
                "",
            ]
            if "time" in kinds:
                lines += [CLOCK_NOTE, ""]
            lines += [compute, ""]
        if calibration is not None:
            lines += clock.calibration_section(calibration, clock_steps)
        frontier = next((p for p in plots if Path(p).name == robustness_report.FRONTIER_PLOT), None)
        lines += robustness_report.section(budgets or {"steps": runs}, plot=frontier)
    else:
        lines += ["No finished runs yet.", ""]
    if notes:
        lines += [notes.strip(), ""]
    for plot in plots:
        if Path(plot).name == robustness_report.FRONTIER_PLOT:
            continue  # in the robustness section
        lines += [f"![{Path(plot).stem}]({Path(plot).name})", ""]
    if unfinished:
        lines += ["Unfinished runs (not in the table): " + ", ".join(unfinished), ""]
    if runs:
        lines += report_checks.run_list(runs, budgets, outliers)
    return "\n".join(lines)


def _tuned_section(budgets: Mapping[str, Sequence[Run]]) -> list[str]:
    """The "Tuned" table(s) of the report: one per budget, each chosen under its own budget."""
    tables = {kind: table for kind, runs in budgets.items() if (table := tuned_table(runs)) is not None}
    if not tables:
        return []
    sample = budgets[next(iter(tables))][0].summary
    per_budget = (
        " The choice is made separately under each budget, among that budget's runs." if len(budgets) > 1 else ""
    )
    lines = [
        "## Tuned",
        "",
        f"For each method, the (lr, ρ) point chosen by mean val loss (over seeds) on {slices_text(sample)}, "
        "which the choice did not see, so the reported loss is free of the selection's optimism. (edge): the "
        "chosen value is the smallest or largest of 3 or more the method ran, so its optimum may lie beyond "
        "them. points: the "
        f"(lr, ρ) points the method ran (every one is in the table above); Δ: report loss minus the tuned "
        f"{REFERENCE_OPTIMIZER}'s at the same seed (mean ± std over seed pairs, n = pairs).{per_budget}",
        "",
    ]
    names = budget_headers(budgets)
    for kind, table in tables.items():
        lines += [f"At {names[kind]}:", "", table, ""]
    return lines


def write_report(
    out_dir: str | Path,
    runs: Sequence[Run],
    *,
    title: str = "samlm compare",
    notes: str = "",
    unfinished: Sequence[str] = (),
    budgets: Mapping[str, Sequence[Run]] | None = None,
    calibration: Mapping[str, Any] | None = None,
    clock_steps: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """``report.md``, ``results.csv``, ``val_loss.png`` and ``sharpness.png`` in ``out_dir``; with runs
    measured by ``--robustness``, a robustness section and ``forgetting.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_title = title
    written = write_plots(runs, out_dir, title=plot_title, budgets=budgets)
    frontier = robustness_report.plot_frontier(
        budgets or {"steps": runs}, out_dir / robustness_report.FRONTIER_PLOT, title=plot_title
    )
    if frontier is not None:
        written["forgetting"] = frontier
    every = list({r.name: r for group in (budgets or {}).values() for r in group}.values()) or runs
    io.atomic_write_text(out_dir / RESULTS_FILE, results_csv(every, budgets))
    written["csv"] = out_dir / RESULTS_FILE
    text = report_markdown(
        runs,
        title=title,
        notes=notes,
        unfinished=unfinished,
        plots=[p.name for k, p in written.items() if k != "csv"],
        budgets=budgets,
        calibration=calibration,
        clock_steps=clock_steps,
    )
    io.atomic_write_text(out_dir / REPORT_FILE, text)
    written["report"] = out_dir / REPORT_FILE
    return written
