"""One-page HTML report comparing methods on one dataset.

``write_report(dataset, metrics_dir, out_dir)`` reads every ``metrics_dir/<method>.json`` (the method is
the file stem, methods are sorted by it) and writes, all directly in ``out_dir``:

* ``index.html``          -- the page (inline CSS, images linked relatively, so the folder is self-contained)
* ``learning_curves.png`` -- loss and validation NDCG@10 per epoch (only when some method has a history)
* ``robustness.png``      -- NDCG@10 against corruption rate p (only when some method has robustness results)

It returns the html path. Everything the report consists of is ``report_files(out_dir)``, so a caller can
log it to MLflow with ``mlflow.log_artifacts(str(out_dir), "report")`` or file by file.

The page shows, in order: a header (dataset, data version md5s, git commit(s), the commands that
reproduce it, hardware, the ``generated`` time from ``context``), one test-metric table per protocol
(rows method x {overall, each domain}, best value per column bold within each scope), the validation
table and fit info, the learning curves, the robustness curves and relative-drop table, and the
history-length bucket table for the first protocol. Anything missing from a metrics file (a failed
method, an older file without history/robustness/...) is shown as "not available"; the page still renders.

Output is deterministic: no clock is read (a timestamp appears only when ``context["generated"]`` is
given) and the PNGs carry no software/date metadata. Plots are drawn with matplotlib's object API on
the Agg canvas (no pyplot, so no global figure state and no display needed).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cdsr.evaluate.results import read_tracked

HTML_NAME = "index.html"
LEARNING_PNG = "learning_curves.png"
ROBUSTNESS_PNG = "robustness.png"
FIGURES = (LEARNING_PNG, ROBUSTNESS_PNG)

METRIC_COLUMNS = ("HR@5", "HR@10", "NDCG@10", "MRR")
OPTIONAL_COLUMNS = ("AUC",)  # shown for a protocol when any of its rows has it
CURVE_METRIC = "NDCG@10"
NA = "not available"
CELL_NA = "n/a"

__all__ = ["FIGURES", "HTML_NAME", "load_metrics", "report_figures", "report_files", "write_report"]


# --------------------------------------------------------------------------------------------- input


def load_metrics(metrics_dir: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``{method: metrics}`` sorted by method (file stem), plus warnings for unreadable files.

    A file that is not valid JSON (or not a JSON object) still yields its method, with no metrics, so
    the report shows it as "not available" rather than silently dropping it.
    """
    metrics_dir = Path(metrics_dir)
    files = sorted(metrics_dir.glob("*.json"), key=lambda p: p.stem) if metrics_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no metrics files (*.json) in {metrics_dir}")
    methods: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for path in files:
        try:
            data = read_tracked(path)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            warnings.append(f"{path.name}: unreadable ({exc})")
            data = {}
        if not isinstance(data, dict):
            warnings.append(f"{path.name}: not a JSON object")
            data = {}
        methods[path.stem] = data
    return methods, warnings


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _finite(value: Any) -> float | None:
    v = _num(value)
    return float(v) if v is not None and math.isfinite(v) else None


def _fmt(value: Any) -> str:
    """4 decimals for floats, ints as they are, yes/no for booleans, 'n/a' for missing."""
    if value is None:
        return CELL_NA
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _first_seen(groups: Iterable[Iterable[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for group in groups:
        for key in group:
            seen.setdefault(str(key), None)
    return list(seen)


def _cell(text: str, best: bool = False, title: str | None = None) -> dict[str, Any]:
    return {"text": text, "best": best, "title": title}


def _bold_best(rows: list[dict[str, Any]], columns: range) -> None:
    """Mark the highest finite value of each column (ties: all of them) among ``rows``."""
    for j in columns:
        values = [r["values"][j] for r in rows if not r["missing"] and r["values"][j] is not None]
        if not values:
            continue
        top = max(values)
        for r in rows:
            if not r["missing"] and r["values"][j] == top:
                r["cells"][j]["best"] = True


# ----------------------------------------------------------------------------------------- tables


def _metric_table(methods: dict[str, dict], block_of: Callable[[dict], Any]) -> dict[str, Any]:
    """Rows method x {overall, each domain}, grouped by scope; best value per column bold within a scope.

    ``block_of(metrics)`` gives one protocol's summary ``{"overall", "domains", "buckets"}`` or None.
    """
    blocks = {m: _dict(block_of(d)) for m, d in methods.items()}
    domains = _first_seen(_dict(b.get("domains")).keys() for b in blocks.values())
    scopes: list[tuple[str, Callable[[dict], dict]]] = [("overall", lambda b: _dict(b.get("overall")))]
    scopes += [(d, lambda b, d=d: _dict(_dict(b.get("domains")).get(d))) for d in domains]
    has = {c: any(_num(get(b).get(c)) is not None for b in blocks.values() for _, get in scopes)
           for c in OPTIONAL_COLUMNS}
    columns = ["n", *METRIC_COLUMNS, *(c for c in OPTIONAL_COLUMNS if has[c])]
    rows: list[dict[str, Any]] = []
    no_domains: list[str] = []
    for scope, get in scopes:
        group: list[dict[str, Any]] = []
        for method, block in blocks.items():
            summary = get(block)
            if not summary:
                if scope == "overall":
                    group.append({"method": method, "scope": scope, "missing": True, "cells": [], "values": [],
                                  "group_start": False})
                elif domains and not _dict(block.get("domains")) and method not in no_domains:
                    no_domains.append(method)
                continue
            values = [_finite(summary.get(c)) for c in columns]
            cells = [_cell(_fmt(_num(summary.get(c)))) for c in columns]
            group.append({"method": method, "scope": scope, "missing": False, "cells": cells, "values": values,
                          "group_start": False})
        _bold_best(group, range(1, len(columns)))  # column 0 is n: not a quality
        if group:
            group[0]["group_start"] = True
        rows += group
    notes = [f"domain-level metrics not available for: {', '.join(no_domains)}"] if no_domains else []
    return {"columns": columns, "rows": rows, "notes": notes, "domains": domains}


def _protocol_names(methods: dict[str, dict]) -> list[str]:
    return _first_seen(_dict(d.get("protocols")).keys() for d in methods.values())


def _protocol_tables(methods: dict[str, dict]) -> list[dict[str, Any]]:
    tables = []
    for i, name in enumerate(_protocol_names(methods)):
        table = _metric_table(methods, lambda d, name=name: _dict(d.get("protocols")).get(name))
        missing = [m for m, d in methods.items() if not _dict(_dict(d.get("protocols")).get(name))]
        table.update(name=name, anchor=f"protocol-{i}", missing=missing)
        tables.append(table)
    return tables


def _validation_table(methods: dict[str, dict]) -> dict[str, Any]:
    table = _metric_table(methods, lambda d: d.get("validation"))
    protocols = _first_seen([str(_dict(d.get("validation")).get("protocol"))] for d in methods.values()
                            if _dict(d.get("validation")).get("protocol") is not None)
    table.update(name="validation", anchor="validation", protocol=", ".join(protocols) or NA,
                 missing=[m for m, d in methods.items() if not _dict(d.get("validation"))])
    return table


def _fit_rows(methods: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for method, d in methods.items():
        fits = _dict(d.get("fit"))
        common = {"method": method, "parameters": _fmt(_num(d.get("parameters"))),
                  "seconds": _seconds(d.get("seconds"))}
        if not fits:
            rows.append({**common, "part": NA, "missing": True})
            continue
        for part, f in fits.items():
            f = _dict(f)
            rows.append({**common, "part": str(part), "missing": False,
                         "best_epoch": _fmt(_num(f.get("best_epoch"))), "best_val": _fmt(_num(f.get("best_val"))),
                         "epochs_run": _fmt(_num(f.get("epochs_run"))),
                         "stopped_early": _fmt(f.get("stopped_early") if isinstance(f.get("stopped_early"), bool)
                                               else None),
                         "train_seconds": _seconds(f.get("train_seconds"))})
    return rows


def _seconds(value: Any) -> str:
    v = _num(value)
    return CELL_NA if v is None else f"{v:.1f}"


def _bucket_key(name: str, order: int) -> tuple[int, float, int]:
    m = re.match(r"\s*(\d+)", name)
    return (0, float(m.group(1)), order) if m else (1, 0.0, order)


def _bucket_table(methods: dict[str, dict]) -> dict[str, Any] | None:
    protocols = _protocol_names(methods)
    if not protocols:
        return None
    first = protocols[0]
    blocks = {m: _dict(_dict(_dict(d.get("protocols")).get(first)).get("buckets")) for m, d in methods.items()}
    seen = _first_seen(b.keys() for b in blocks.values())
    buckets = [b for _, b in sorted((_bucket_key(b, i), b) for i, b in enumerate(seen))]
    rows = []
    for method, block in blocks.items():
        if not block:
            rows.append({"method": method, "missing": True, "cells": [], "values": []})
            continue
        cells, values = [], []
        for b in buckets:
            s = _dict(block.get(b))
            n = _num(s.get("n"))
            cells.append(_cell(_fmt(_num(s.get(CURVE_METRIC))), title=None if n is None else f"n={n}"))
            values.append(_finite(s.get(CURVE_METRIC)))
        rows.append({"method": method, "missing": False, "cells": cells, "values": values})
    _bold_best(rows, range(len(buckets)))
    return {"protocol": first, "buckets": buckets, "rows": rows,
            "has_any": any(not r["missing"] for r in rows)}


# ------------------------------------------------------------------------------------- robustness


def _robustness(methods: dict[str, dict]) -> dict[str, dict[tuple[str, str], dict[float, dict]]]:
    """``{method: {(scope, kind): {p: entry}}}`` for methods with robustness results."""
    out: dict[str, dict[tuple[str, str], dict[float, dict]]] = {}
    for method, d in methods.items():
        entries = [e for e in _list(d.get("robustness")) if isinstance(e, dict)]
        series: dict[tuple[str, str], dict[float, dict]] = {}
        for e in entries:
            p = _finite(e.get("p"))
            if p is None:
                p = 0.0 if str(e.get("kind")) == "clean" else None
            if p is None:
                continue
            series.setdefault((str(e.get("scope", "inference")), str(e.get("kind"))), {})[p] = e
        if series:
            out[method] = series
    return out


def _pct(value: float | None) -> str:
    return CELL_NA if value is None else f"{100 * value:.2f}%"


def _rel_drop(entry: dict, clean: float | None) -> float | None:
    v = _finite(entry.get(f"rel_drop_{CURVE_METRIC}"))
    if v is not None:
        return v
    x = _finite(entry.get(CURVE_METRIC))
    return (clean - x) / clean if x is not None and clean else None


def _robustness_table(methods: dict[str, dict], rob: dict) -> dict[str, Any]:
    kinds = _first_seen([f"{s}\x00{k}" for (s, k) in series if k != "clean"] for series in rob.values())
    kinds_t = [tuple(k.split("\x00", 1)) for k in kinds]
    ps = sorted({p for series in rob.values() for (s, k), pts in series.items() if k != "clean" for p in pts})
    rows = []
    for method in methods:
        series = rob.get(method)
        if not series:
            rows.append({"method": method, "missing": True})
            continue
        for scope, kind in kinds_t:
            if (scope, kind) not in series:
                continue
            clean = _finite(_dict(series.get((scope, "clean"), {}).get(0.0)).get(CURVE_METRIC))
            pts = series[(scope, kind)]
            rows.append({"method": method, "missing": False, "scope": scope, "kind": kind, "clean": _fmt(clean),
                         "cells": [_pct(_rel_drop(pts[p], clean)) if p in pts else CELL_NA for p in ps]})
    protocols = _first_seen([str(d["robustness_protocol"])] for d in methods.values()
                            if d.get("robustness_protocol") is not None and d.get("robustness"))
    return {"ps": [_fmt(float(p)) for p in ps], "rows": rows, "protocol": ", ".join(protocols) or NA}


# ------------------------------------------------------------------------------------------ plots


def _mpl_text(s: str) -> str:
    """Text for matplotlib: no mathtext from '$', and no leading '_' (legend would hide the line)."""
    s = s.replace("$", r"\$")
    return " " + s if s.startswith("_") else s


def _colors(methods: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png", metadata={"Software": None})


def _history_parts(d: dict) -> list[tuple[str | None, list[dict]]]:
    """``[(part, epochs)]``: part None for a merged history, the domain name for single-variant ones."""
    history = d.get("history")
    if isinstance(history, list):
        history = {"merged": history}
    parts = []
    for part, epochs in _dict(history).items():
        epochs = [e for e in _list(epochs) if isinstance(e, dict)]
        if epochs:
            parts.append((None if part == "merged" else str(part), epochs))
    return parts


def _plot_learning(methods: dict[str, dict], path: Path) -> list[str]:
    """Write the learning-curve PNG; return the methods plotted (none: no file)."""
    histories = {m: _history_parts(d) for m, d in methods.items()}
    histories = {m: h for m, h in histories.items() if h}
    if not histories:
        return []
    colors = _colors(list(methods))
    styles = ["-", "--", ":", "-."]
    fig = _new_figure(12, 4.5)
    ax_loss, ax_val = fig.subplots(1, 2)
    any_val = False
    for method, parts in histories.items():
        for i, (part, epochs) in enumerate(parts):
            label = _mpl_text(method if part is None else f"{method} [{part}]")
            style = {"color": colors[method], "linestyle": styles[i % len(styles)], "marker": "o", "markersize": 3}
            loss = [(e.get("epoch", j), _finite(e.get("loss"))) for j, e in enumerate(epochs)]
            loss = [(x, y) for x, y in loss if _finite(x) is not None and y is not None]
            if loss:
                ax_loss.plot(*zip(*loss), label=label, **style)
            val = [(e.get("epoch", j), _finite(e.get(f"val_{CURVE_METRIC}"))) for j, e in enumerate(epochs)]
            val = [(x, y) for x, y in val if _finite(x) is not None and y is not None]
            if val:
                any_val = True
                ax_val.plot(*zip(*val), label=label, **style)
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    ax_val.set(title=f"validation {CURVE_METRIC}", xlabel="epoch", ylabel=CURVE_METRIC)
    if not any_val:
        ax_val.text(0.5, 0.5, "no validation points", ha="center", va="center", transform=ax_val.transAxes)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    _save(fig, path)
    return list(histories)


def _plot_robustness(methods: dict[str, dict], rob: dict, path: Path) -> list[str]:
    """One subplot per (scope, kind) other than clean; x = p with the clean point at p=0, y = NDCG@10."""
    kinds = _first_seen([f"{s}\x00{k}" for (s, k) in series if k != "clean"] for series in rob.values())
    if not kinds:
        return []
    colors = _colors(list(methods))
    ncols = min(4, len(kinds))
    nrows = math.ceil(len(kinds) / ncols)
    fig = _new_figure(3.6 * ncols + 0.5, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    plotted: list[str] = []
    for ax, key in zip(axes, kinds):
        scope, kind = key.split("\x00", 1)
        for method, series in rob.items():
            if (scope, kind) not in series:
                continue
            pts = dict(series.get((scope, "clean"), {}))
            pts = {p: e for p, e in pts.items() if p == 0.0}
            pts.update(series[(scope, kind)])
            xy = sorted((p, _finite(e.get(CURVE_METRIC))) for p, e in pts.items())
            xy = [(x, y) for x, y in xy if y is not None]
            if xy:
                ax.plot(*zip(*xy), marker="o", markersize=3, color=colors[method], label=_mpl_text(method))
                if method not in plotted:
                    plotted.append(method)
        ax.set(title=_mpl_text(f"{scope}: {kind}"), xlabel="p", ylabel=CURVE_METRIC)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for ax in axes[len(kinds):]:
        ax.set_visible(False)
    _save(fig, path)
    return plotted


def plot_robustness(methods: dict[str, dict], path: Path) -> list[str]:
    """The robustness figure of ``{method: metrics}`` (the report's, and the benchmark's per
    method): NDCG@10 against the noise level p, one panel per noise kind and scope. Returns the
    methods drawn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return _plot_robustness(methods, _robustness(methods), path)


# ----------------------------------------------------------------------------------------- header


def _grouped(methods: dict[str, dict], describe: Callable[[dict], str | None]) -> list[dict[str, Any]]:
    """``[{"value", "methods"}]`` grouping methods by an identical description (None: missing)."""
    groups: dict[str, list[str]] = {}
    missing = []
    for method, d in methods.items():
        v = describe(d)
        if v is None:
            missing.append(method)
        else:
            groups.setdefault(v, []).append(method)
    out = [{"value": v, "methods": ms, "all": len(ms) == len(methods)} for v, ms in groups.items()]
    if missing:
        out.append({"value": NA, "methods": missing, "all": len(missing) == len(methods)})
    return out


def _describe_dict(value: Any) -> str | None:
    value = _dict(value)
    return ", ".join(f"{k}={v}" for k, v in value.items()) if value else None


def _header(dataset: str, methods: dict[str, dict], context: dict[str, Any]) -> dict[str, Any]:
    commands = context.get("commands")
    if isinstance(commands, str):
        commands = [commands]
    if not commands:
        commands = ["dvc repro", f"cdsr report --dataset {dataset}"]
    data_versions = _grouped(methods, lambda d: json.dumps(_dict(d.get("data_version")), sort_keys=True)
                             if _dict(d.get("data_version")) else None)
    for g in data_versions:
        g["files"] = sorted(json.loads(g["value"]).items()) if g["value"] != NA else []
    generated = context.get("generated")
    extra = [(str(k), str(v)) for k, v in context.items() if k not in ("commands", "generated")]
    runs = []
    for method, d in methods.items():
        runs.append({"method": method, "model": _fmt(d.get("model")), "variant": _fmt(d.get("variant")),
                     "seed": _fmt(_num(d.get("seed"))), "mlflow_run_id": str(d.get("mlflow_run_id") or NA),
                     "git_commit": str(d.get("git_commit") or NA), "command": str(d.get("command") or NA)})
    mismatched = [m for m, d in methods.items() if d.get("dataset") is not None and str(d.get("dataset")) != dataset]
    return {
        "dataset": dataset,
        "generated": NA if generated is None else str(generated),
        "commands": [str(c) for c in commands],
        "data_versions": data_versions,
        "data_versions_differ": len([g for g in data_versions if g["value"] != NA]) > 1,
        "commits": _grouped(methods, lambda d: str(d["git_commit"]) if d.get("git_commit") else None),
        "hardware": _grouped(methods, lambda d: _describe_dict(d.get("hardware"))),
        "extra": extra,
        "runs": runs,
        "mismatched": mismatched,
    }


# ------------------------------------------------------------------------------------------- page


def report_figures(out_dir: Path) -> list[Path]:
    """The PNGs the last ``write_report`` left in ``out_dir`` (sorted)."""
    return sorted(p for p in (Path(out_dir) / name for name in FIGURES) if p.is_file())


def report_files(out_dir: Path) -> list[Path]:
    """Everything the report consists of: ``index.html`` then its PNGs -- the files to log as artifacts."""
    html = Path(out_dir) / HTML_NAME
    return ([html] if html.is_file() else []) + report_figures(out_dir)


def write_report(dataset: str, metrics_dir: Path, out_dir: Path, context: dict | None = None,
                 leaderboard: dict | None = None) -> Path:
    """Read every metrics_dir/<method>.json, write out_dir/index.html plus PNG plots in out_dir
    (relative <img> links), return the html path. Raise FileNotFoundError naming metrics_dir when it
    has no *.json.

    ``context`` (optional): ``"commands"`` (str or list: how to reproduce; default ``dvc repro`` and
    ``cdsr report --dataset <dataset>``), ``"generated"`` (the only timestamp on the page); any other
    keys are listed in the header as they are. All files are written directly in ``out_dir``; see
    ``report_files``. ``leaderboard`` (:func:`cdsr.leaderboard.build`): adds its tables; with
    it, a dataset the benchmark never ran gets a page of the leaderboard alone.
    """
    try:
        methods, warnings = load_metrics(Path(metrics_dir))
    except FileNotFoundError:
        if leaderboard is None:
            raise
        methods, warnings = {}, [f"no benchmark metrics in {metrics_dir}: this page holds the leaderboard only"]
    context = dict(context or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:  # a figure from an earlier report must not outlive its data
        (out_dir / name).unlink(missing_ok=True)

    header = _header(dataset, methods, context)
    for m in header["mismatched"]:
        warnings.append(f"{m}: metrics are for dataset '{methods[m].get('dataset')}', not '{dataset}'")
    if header["data_versions_differ"]:
        warnings.append("methods were evaluated on different data versions (see header)")

    learning = _plot_learning(methods, out_dir / LEARNING_PNG)
    rob = _robustness(methods)
    rob_plotted = _plot_robustness(methods, rob, out_dir / ROBUSTNESS_PNG)

    page = {
        "title": f"cdsr report: {dataset}",
        "header": header,
        "warnings": warnings,
        "methods": list(methods),
        "protocols": _protocol_tables(methods),
        "validation": _validation_table(methods),
        "fit_rows": _fit_rows(methods),
        "learning": {"image": LEARNING_PNG if learning else None,
                     "missing": [m for m in methods if m not in learning]},
        "robustness": {"image": ROBUSTNESS_PNG if rob_plotted else None,
                       "missing": [m for m in methods if m not in rob],
                       "table": _robustness_table(methods, rob) if rob else None},
        "buckets": _bucket_table(methods),
        "leaderboard": _leaderboard(leaderboard),
        "metric": CURVE_METRIC,
        "NA": NA,
    }
    html = _template().render(**page)
    path = out_dir / HTML_NAME
    path.write_text(html, encoding="utf-8")
    return path


def _leaderboard(lb: dict | None) -> dict | None:
    if lb is None:
        return None
    from cdsr.leaderboard import tables, versus_published

    return {"tables": tables(lb), "versus": versus_published(lb), "published": lb["published"],
            "studies": lb["studies"]}


def _template():
    from jinja2 import Environment, StrictUndefined

    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                      keep_trailing_newline=True)
    return env.from_string((Path(__file__).parent / "templates" / "report.html.j2").read_text())

