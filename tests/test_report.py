"""The HTML comparison report (cdsr.report) on small hand-written metrics files."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cdsr.report import FIGURES, HTML_NAME, report_figures, report_files, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOMAINS = ("Books", "CDs_&_Vinyl")  # '&' must come out escaped


def _summary(base: float, n: int = 100, auc: bool = False) -> dict:
    s = {"n": n, "HR@1": base / 4, "NDCG@1": base / 4, "HR@5": base, "NDCG@5": base / 2, "HR@10": base * 1.5,
         "NDCG@10": base * 0.75, "MRR": base / 2}
    if auc:
        s["AUC"] = 0.5 + base
    return s


def _protocol(name: str, base: float, auc: bool = False, domains: bool = True, buckets: bool = True) -> dict:
    p = {"protocol": name, "overall": _summary(base, 200, auc)}
    if domains:
        p["domains"] = {"Books": _summary(base * 1.2, 120, auc), "CDs_&_Vinyl": _summary(base * 0.7, 80, auc)}
    if buckets:
        p["buckets"] = {"1-5": _summary(base * 0.5, 50), "6-10": _summary(base, 60), "51+": _summary(base * 2, 90)}
    return p


def _robustness(clean: float) -> list[dict]:
    rows = []
    for scope, kinds in (("inference", ("substitute", "insert")), ("train", ("substitute",))):
        rows.append({"scope": scope, "kind": "clean", "p": 0.0, "NDCG@10": clean, "rel_drop_NDCG@10": 0.0})
        for kind in kinds:
            for p in (0.1, 0.2):
                drop = p * 1.25
                rows.append({"scope": scope, "kind": kind, "p": p, "NDCG@10": clean * (1 - drop),
                             "rel_drop_NDCG@10": drop})
    return rows


def _history(start: float) -> list[dict]:
    return [{"epoch": e, "loss": start - e, "val_NDCG@10": 0.1 + 0.02 * e, "val_HR@10": 0.2 + 0.02 * e}
            for e in range(3)]


def _full(method: str, model: str, variant: str, base: float) -> dict:
    parts = ["merged"] if variant == "merged" else list(DOMAINS)
    return {
        "dataset": "synthetic", "model": model, "variant": variant, "seed": 42, "method": method,
        "protocols": {"full": _protocol("full", base),
                      "sampled-999": _protocol("sampled-999", base * 2, auc=True, buckets=False)},
        "validation": _protocol("full", base * 1.1),
        "fit": {p: {"best_epoch": 2, "best_val": 0.14, "epochs_run": 3, "stopped_early": False,
                    "train_seconds": 12.34} for p in parts},
        "parameters": 312000, "seconds": 31.2,
        "hardware": {"device": "cpu", "torch": "2.13.0+cpu", "cpu_threads": 2},
        "history": {p: _history(7.0 + i) for i, p in enumerate(parts)},
        "robustness": _robustness(base * 0.75), "robustness_protocol": "full",
        "data_version": {"split.parquet": "0123abcd", "negatives.parquet": "4567ef01"},
        "mlflow_run_id": f"run-{model}-{variant}", "git_commit": "605d300c0ffee", "command": "dvc repro",
    }


def _write(d: Path, method: str, data: dict) -> None:
    (d / f"{method}.json").write_text(json.dumps(data))


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Path:
    d = tmp_path / "metrics"
    d.mkdir()
    _write(d, "sasrec", _full("sasrec", "sasrec", "merged", 0.2))
    _write(d, "sasrec-single", _full("sasrec-single", "sasrec", "single", 0.3))
    # an older / partly failed file: no history, robustness, data_version, mlflow run, git commit, domains
    _write(d, "a<b>", {"dataset": "synthetic", "model": "hstu", "variant": "merged", "seed": 1,
                       "protocols": {"full": _protocol("full", 0.1, domains=False, buckets=False)},
                       "parameters": 1000})
    return d


class _Tables(HTMLParser):
    """``{table id: [[(cell text, bold)]]}`` from the page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, bool]]]] = {}
        self._rows: list | None = None
        self._cell: list[str] | None = None
        self._bold = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._rows = self.tables.setdefault(dict(attrs).get("id", f"t{len(self.tables)}"), [])
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th") and self._rows is not None:
            self._cell, self._bold = [], False
        elif tag == "b" and self._cell is not None:
            self._bold = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._rows[-1].append(("".join(self._cell).strip(), self._bold))
            self._cell = None
        elif tag == "table":
            self._rows = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _tables(html: str) -> dict[str, list[list[tuple[str, bool]]]]:
    parser = _Tables()
    parser.feed(html)
    return parser.tables


def _row(table: list[list[tuple[str, bool]]], method: str, scope: str) -> dict[str, tuple[str, bool]]:
    header = [text for text, _ in table[0]]
    for row in table[1:]:
        if row[0][0] == method and row[1][0] == scope:
            return dict(zip(header, row))
    raise AssertionError(f"no row {method}/{scope}")


def test_report_page_and_figures(metrics_dir: Path, tmp_path: Path):
    out = tmp_path / "report"
    html_path = write_report("synthetic", metrics_dir, out,
                             context={"generated": "2025-01-02 03:04", "commands": ["make all", "cdsr x"]})
    assert html_path == out / HTML_NAME and html_path.is_file()
    html = html_path.read_text()

    # every method and domain, escaped
    for name in ("sasrec", "sasrec-single", "a&lt;b&gt;", "Books", "CDs_&amp;_Vinyl"):
        assert name in html
    assert "a<b>" not in html and "CDs_&_Vinyl" not in html
    # header: context, data version, commit, hardware
    for text in ("2025-01-02 03:04", "make all", "cdsr x", "0123abcd", "605d300c0ffee", "torch=2.13.0+cpu",
                 "run-sasrec-single"):
        assert text in html
    assert "not available" in html  # a<b> lacks history, robustness, data version, ...

    tables = _tables(html)
    full = tables["protocol-0"]
    assert [h for h, _ in full[0]] == ["method", "scope", "n", "HR@5", "HR@10", "NDCG@10", "MRR"]
    # overall NDCG@10: sasrec 0.15, sasrec-single 0.225 (best), a<b> 0.075 -- formatted to 4 decimals
    assert _row(full, "sasrec-single", "overall")["NDCG@10"] == ("0.2250", True)
    assert _row(full, "sasrec", "overall")["NDCG@10"] == ("0.1500", False)
    assert _row(full, "a<b>", "overall")["NDCG@10"] == ("0.0750", False)
    assert _row(full, "a<b>", "overall")["n"] == ("200", False)  # n shown, never bolded
    # best is per scope: in Books the single variant (0.3*1.2*1.5 = 0.54) beats sasrec (0.36)
    assert _row(full, "sasrec-single", "Books")["HR@10"] == ("0.5400", True)
    assert _row(full, "sasrec", "Books")["HR@10"] == ("0.3600", False)
    assert "domain-level metrics not available for: a&lt;b&gt;" in html
    # AUC only where present; the method without the protocol still gets a row
    sampled = tables["protocol-1"]
    assert [h for h, _ in sampled[0]][-1] == "AUC"
    assert _row(sampled, "sasrec-single", "overall")["AUC"] == ("1.1000", True)
    assert _row(sampled, "a<b>", "overall")["n"][0] == "not available"

    assert _row(tables["validation"], "sasrec", "overall")["NDCG@10"] == ("0.1650", False)
    fit = {(r[0][0], r[1][0]): [c for c, _ in r] for r in tables["fit"][1:]}
    assert fit[("sasrec-single", "Books")][2:] == ["2", "0.1400", "3", "no", "12.3", "312000", "31.2"]
    assert fit[("a<b>", "not available")][-2:] == ["1000", "n/a"]

    rob = {(r[0][0], r[1][0], r[2][0]): [c for c, _ in r[3:]] for r in tables["robustness-table"][1:] if len(r) > 3}
    assert [c for c, _ in tables["robustness-table"][0]][3:] == ["clean NDCG@10", "p=0.1000", "p=0.2000"]
    assert rob[("sasrec", "inference", "substitute")] == ["0.1500", "12.50%", "25.00%"]
    assert ("sasrec", "train", "substitute") in rob and ("sasrec", "inference", "clean") not in rob

    buckets = tables["bucket-table"]
    assert [h for h, _ in buckets[0]] == ["method", "1-5", "6-10", "51+"]
    by_method = {r[0][0]: dict(zip([h for h, _ in buckets[0]], r)) for r in buckets[1:]}
    # bucket 51+ NDCG@10 = 2 * base * 0.75: sasrec-single 0.45 (best), sasrec 0.30
    assert by_method["sasrec-single"]["51+"] == ("0.4500 (n=90)", True)
    assert by_method["sasrec"]["51+"] == ("0.3000 (n=90)", False)
    assert by_method["a<b>"]["1-5"][0] == "not available"

    figures = report_figures(out)
    assert [p.name for p in figures] == sorted(FIGURES)
    for png in figures:
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f'src="{png.name}"' in html  # relative link
    assert report_files(out) == [html_path, *figures]


def test_report_is_deterministic_and_defaults(metrics_dir: Path, tmp_path: Path):
    a = write_report("synthetic", metrics_dir, tmp_path / "a")
    b = write_report("synthetic", metrics_dir, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    for name in FIGURES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    html = a.read_text()
    assert "dvc repro" in html and "cdsr report --dataset synthetic" in html


def test_report_without_histories_or_robustness(tmp_path: Path):
    d = tmp_path / "m"
    d.mkdir()
    _write(d, "only", {"protocols": {"full": _protocol("full", 0.2)}})
    (d / "broken.json").write_text("{not json")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "robustness.png").write_bytes(PNG_MAGIC)  # stale figure from an earlier report
    html = write_report("other", d, out).read_text()
    assert report_figures(out) == []
    assert "<img" not in html
    assert "broken.json: unreadable" in html
    assert html.count("not available") >= 5
    assert _row(_tables(html)["protocol-0"], "only", "overall")["MRR"] == ("0.1000", True)


def test_report_needs_metrics_files(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        write_report("synthetic", empty, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="absent"):
        write_report("synthetic", tmp_path / "absent", tmp_path / "out")
