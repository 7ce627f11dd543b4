"""The reproduction report: what a run of the notebooks reproduced, at a glance.

:mod:`adjoint_lib.reproduce` (``make reproduce``) executes the notebooks; :func:`write_report` then
writes ``<out>/report.md`` (figures in ``<out>/report_files/``) and the same as one self-contained
``<out>/report.html`` (figures as base64 data URIs) with

* the machine, profile, date and commit;
* per notebook: status and time, the cell that failed and its error, the checked claims (cells whose
  source contains ``# NBVAL_CHECK_OUTPUT``, named ``In [k]`` for the k-th code cell as the exported
  HTML shows it; nbval calls it ``Cell k-1``) printed by this run against the outputs stored in the
  committed notebook, compared as ``pytest --nbval-lax`` compares them (streams merged by name, every
  text MIME type, images and widget ids ignored) except that trailing whitespace is ignored, and its
  key figures;
* the paper tasks' headline metrics against their targets, one table;
* the benchmark's acceptance checks (``results.json["checks"]`` of :mod:`adjoint_lib.bench`): the
  shipped ``data/bench/*/results.json`` and every ``results.json`` this run wrote under ``<out>``.

Only this run counts: results come from the executed notebooks and from files written after the run
started; unreadable JSON is skipped with a warning. :func:`exit_code` is 1 when a notebook failed, a
checked claim does not hold or a headline target is missed (benchmark checks inform only).

Contracts for notebooks:

* **headline metric** - call :func:`headline` in an *unchecked* cell (the value changes with the
  machine). It displays an ``application/json`` output ``{"report": {"task", "metric", "value",
  "target", "holds"}}``; any executed output of that MIME type with a top-level ``"report"`` key (a
  dict or a list of dicts) becomes a row of the metrics table.
* **key figures** - the images of cells tagged ``report-figure``; without such tags the first
  :data:`FIGURES_PER_NOTEBOOK` images of the notebook. Wider than :data:`FIGURE_MAX_WIDTH` pixels
  they are scaled down.
"""
from __future__ import annotations

import base64
import difflib
import html
import io as _io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .io import atomic_dir, json_safe, read_json, write_text
from .paths import ROOT, data_dir

CHECK_MARKER = "# NBVAL_CHECK_OUTPUT"
FIGURE_TAG = "report-figure"
FIGURES_PER_NOTEBOOK = 2
FIGURE_MAX_WIDTH = 720
# nbval's skip_compare for --nbval-lax without nbdime: not compared.
_NOT_COMPARED = {"image/png", "image/jpeg", "application/vnd.jupyter.widget-view+json"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BACKSPACE = re.compile("[^\n]\x08")                       # a character erased by a backspace
_CARRIAGE_RETURN = re.compile(r"^.*\r(?=[^\n])", re.MULTILINE)  # a line overwritten after \r


# =========================================================================== notebook side
def headline(task: str, metric: str, value: Any, target: str, holds: bool | None = None) -> None:
    """Display one headline metric for the reproduction report (and a readable line for people).

    ``target`` is the criterion as text (e.g. ``">= 0.8"``); ``holds`` whether ``value`` meets it.
    Call it in a cell without ``# NBVAL_CHECK_OUTPUT``: the value differs between machines."""
    from IPython.display import display

    row = {"task": task, "metric": metric, "value": json_safe(value), "target": target,
           "holds": None if holds is None else bool(holds)}
    verdict = "" if holds is None else (": met" if holds else ": MISSED")
    display({"application/json": {"report": row},
             "text/plain": f"{task} | {metric} = {_fmt(row['value'])} (target {target}){verdict}"}, raw=True)


# =========================================================================== reading notebooks
@dataclass
class Claim:
    """One checked cell: its text output in this run and in the committed notebook."""
    cell: int            # k of In [k]: the k-th code cell (nbval's "Cell k-1")
    printed: str
    stored: str
    verdict: str         # "holds" | "does not hold" | "not run" | "no stored output"


@dataclass
class NotebookRun:
    """What one executed notebook showed."""
    name: str
    status: str                                   # "ok" | "failed" | "timed out"
    seconds: float
    error: str | None = None                      # "In [7] (`first line`): ValueError: ..."
    claims: list[Claim] = field(default_factory=list)
    figures: list[tuple[int, bytes]] = field(default_factory=list)   # (k of In [k], PNG)
    metrics: list[dict] = field(default_factory=list)
    exported: dict[str, Path] = field(default_factory=dict)          # "ipynb" / "html" -> file


def _coalesced_text(outputs: Sequence[dict]) -> dict[str, list[str]]:
    """The compared text of a cell's outputs, as nbval sees it: streams merged by name, every
    other MIME type as a list of values; trailing whitespace removed from each line."""
    streams: dict[str, str] = {}
    values: dict[str, list[str]] = {}
    for out in outputs:
        if out.get("output_type") == "stream":
            streams[out.get("name", "stdout")] = streams.get(out.get("name", "stdout"), "") + out.get("text", "")
        elif out.get("output_type") == "error":
            values.setdefault("error", []).append(f"{out.get('ename')}: {out.get('evalue')}")
        for mime, value in out.get("data", {}).items():
            if mime not in _NOT_COMPARED:
                values.setdefault(mime, []).append(value if isinstance(value, str) else repr(value))
    for name, text in streams.items():
        while _BACKSPACE.search(text):
            text = _BACKSPACE.sub("", text)
        text = _CARRIAGE_RETURN.sub("", text)
        values[name] = [text]
    return {k: [_normalize(v) for v in vs] for k, vs in values.items()}


def strip_ansi(text: str) -> str:
    """``text`` without terminal color codes (tracebacks carry them)."""
    return _ANSI.sub("", text)


def _normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in strip_ansi(text).splitlines()).rstrip("\n")


def _shown(compared: dict[str, list[str]]) -> str:
    """What a reader sees of a cell: stdout, then text results, then stderr and errors."""
    keys = ["stdout", "text/plain"] + sorted(k for k in compared if k not in ("stdout", "text/plain"))
    return "\n".join(v for k in keys for v in compared.get(k, []) if v)


def checked_claims(committed: dict, executed: dict) -> list[Claim]:
    """The checked cells of ``executed`` compared with the same cells of ``committed``."""
    claims = []
    for k, (ref, new) in enumerate(_code_cells(committed, executed), 1):
        if CHECK_MARKER not in ref.get("source", ""):
            continue
        stored, printed = _coalesced_text(ref.get("outputs", [])), _coalesced_text(new.get("outputs", []))
        if new.get("execution_count") is None:
            verdict = "not run"
        elif ref.get("execution_count") is None:
            verdict = "no stored output"
        else:
            verdict = "holds" if stored == printed else "does not hold"
        claims.append(Claim(k, _shown(printed), _shown(stored), verdict))
    return claims


def _code_cells(*nbs: dict) -> list[tuple[dict, ...]]:
    """The code cells of notebooks with the same cells, side by side: the k-th tuple is ``In [k]``."""
    return [cells for cells in zip(*(nb["cells"] for nb in nbs)) if cells[0].get("cell_type") == "code"]


def _png(b64: str | list[str], max_width: int) -> bytes:
    data = base64.b64decode("".join(b64) if isinstance(b64, list) else b64)
    try:
        from PIL import Image

        im = Image.open(_io.BytesIO(data))
        if im.width <= max_width:
            return data
        im = im.resize((max_width, max(1, round(im.height * max_width / im.width))), Image.LANCZOS)
        buf = _io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        return buf.getvalue()
    except Exception as exc:  # a figure that cannot be scaled is shown as it is
        warnings.warn(f"figure not scaled: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
        return data


def key_figures(nb: dict, limit: int = FIGURES_PER_NOTEBOOK, max_width: int = FIGURE_MAX_WIDTH
                ) -> list[tuple[int, bytes]]:
    """PNG images of the cells tagged ``report-figure`` (all of them), else the first ``limit``
    images of the notebook; each ``(k of In [k], PNG bytes)``, at most ``max_width`` wide."""
    cells = list(enumerate(_code_cells(nb), 1))
    tagged = [(i, c) for i, (c,) in cells if FIGURE_TAG in c.get("metadata", {}).get("tags", [])]
    found = [(i, out["data"]["image/png"]) for i, c in (tagged or [(i, c) for i, (c,) in cells])
             for out in c.get("outputs", []) if "image/png" in out.get("data", {})]
    return [(i, _png(b64, max_width)) for i, b64 in (found if tagged else found[:limit])]


def gathered_metrics(nb: dict) -> list[dict]:
    """The rows of every ``application/json`` output with a top-level ``"report"`` key."""
    rows = []
    for c in nb["cells"]:
        for out in c.get("outputs", []):
            payload = out.get("data", {}).get("application/json")
            if not isinstance(payload, dict) or "report" not in payload:
                continue
            items = payload["report"] if isinstance(payload["report"], list) else [payload["report"]]
            for item in items:
                if isinstance(item, dict):
                    rows.append(dict(item))
                else:
                    warnings.warn(f"ignoring a report entry that is not a dict: {item!r:.80}", RuntimeWarning,
                                  stacklevel=2)
    return rows


# =========================================================================== other sources
def benchmark_checks(out: str | os.PathLike, since: float) -> list[dict]:
    """Acceptance checks of the shipped ``data/bench/*/results.json`` and of the ``results.json``
    files under ``out`` written at or after ``since`` (a ``time.time()``); unreadable ones skipped."""
    found = [(p, "shipped") for p in sorted(data_dir("bench").glob("*/results.json"))]
    found += [(p, "this run") for p in sorted(Path(out).rglob("results.json"))
              if "_jobs" not in p.parts and p.stat().st_mtime >= since]
    sets = []
    for p, origin in found:
        res = read_json(p, what="benchmark results")
        if not isinstance(res, dict) or not isinstance(res.get("checks"), dict):
            continue
        meta = res.get("meta", {}) if isinstance(res.get("meta"), dict) else {}
        sets.append({"name": p.parent.name, "origin": origin, "checks": res["checks"], "meta": meta,
                     "path": p.relative_to(ROOT) if p.is_relative_to(ROOT) else p})
    return sets


def machine(profile: str | None = None) -> dict:
    """CPU / GPU, threads, library versions, commit and profile of this process."""
    import torch

    from .bench import machine_meta
    from .paths import profile as resolve_profile

    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = machine_meta(device, torch.get_num_threads())
    meta["profile"] = resolve_profile(profile)
    return meta


# =========================================================================== rendering
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _td(s: Any, width: int = 0) -> str:
    """Text for a markdown table cell: one line, ``|`` escaped, optionally shortened."""
    s = " ".join(str(s).split())
    if width and len(s) > width:
        s = s[:width - 1] + "…"
    return s.replace("|", "\\|")


def _verdict(holds: Any) -> str:
    return "-" if holds is None else ("met" if holds else "**missed**")


def exit_code(runs: Sequence[NotebookRun]) -> int:
    """1 when a notebook failed, a checked claim does not hold or a headline target is missed."""
    bad = any(r.status != "ok" for r in runs) or any(c.verdict == "does not hold" for r in runs for c in r.claims)
    return 1 if bad or any(m.get("holds") is False for r in runs for m in r.metrics) else 0


def _summary(runs: Sequence[NotebookRun]) -> str:
    failed = [r.name for r in runs if r.status != "ok"]
    claims = [c for r in runs for c in r.claims]
    holds = sum(c.verdict == "holds" for c in claims)
    metrics = [m for r in runs for m in r.metrics if m.get("holds") is not None]
    parts = [f"{len(runs) - len(failed)} of {len(runs)} notebooks ran" + (f" ({', '.join(failed)} did not)" if failed else ""),
             f"{holds} of {len(claims)} checked claims hold"]
    if metrics:
        parts.append(f"{sum(bool(m['holds']) for m in metrics)} of {len(metrics)} headline targets met")
    return ("**Reproduced.** " if exit_code(runs) == 0 else "**Not reproduced (exit code 1).** ") + "; ".join(parts) + "."


def render_markdown(runs: Sequence[NotebookRun], info: dict, bench: Sequence[dict],
                    figure_src: Callable[[str, bytes], str]) -> str:
    """The report as markdown. ``figure_src(stem, png)`` returns the image link for one figure."""
    lines = ["# Reproduction report", "", _summary(runs), ""]
    lines += [f"- **Date**: {info.get('date', '?')} (UTC), {info.get('total_seconds', 0):.0f} s in all",
              f"- **Machine**: {info.get('cpu_model', '?')}, {info.get('cpu_count', '?')} CPU threads"
              + (f", GPU {info['gpu_name']}" if info.get("gpu_name") else "")
              + f"; torch {info.get('torch_version', '?')} (using {info.get('torch_threads', '?')} of them here), "
              f"diffusers {info.get('diffusers_version', '?')}, Python {info.get('python_version', '?')}",
              f"- **Profile**: `{info.get('profile', '?')}`; commit `{info.get('git_commit', '?')}`; "
              f"command `{info.get('command', '')}`", ""]
    lines += ["| notebook | status | time | checked claims | headline targets | executed |",
              "|---|---|---:|---|---|---|"]
    for r in runs:
        n_hold = sum(c.verdict == "holds" for c in r.claims)
        claims = f"{n_hold}/{len(r.claims)} hold" if r.claims else "-"
        if n_hold < len(r.claims):
            claims += "".join(f", {sum(c.verdict == v for c in r.claims)} {short}" for v, short in
                              (("does not hold", "fail"), ("not run", "not run"), ("no stored output", "unstored"))
                              if any(c.verdict == v for c in r.claims))
        judged = [m for m in r.metrics if m.get("holds") is not None]
        targets = f"{sum(bool(m['holds']) for m in judged)}/{len(judged)} met" if judged else "-"
        status = "ok" if r.status == "ok" else f"**{r.status}**: {_td(r.error, 140)}"
        links = " ".join(f"[{k}](notebooks/{p.name})" for k, p in r.exported.items())
        lines.append(f"| {r.name} | {status} | {r.seconds:.0f} s | {claims} | {targets} | {links} |")
    lines += ["", "## Paper tasks: headline metrics", ""]
    rows = [(r.name, m) for r in runs for m in r.metrics]
    if rows:
        lines += ["| task | metric | value | target | verdict | notebook |", "|---|---|---:|---|---|---|"]
        lines += [f"| {_td(m.get('task', '?'))} | {_td(m.get('metric', '?'))} | {_td(_fmt(m.get('value')))} | "
                  f"{_td(m.get('target', '-'))} | {_verdict(m.get('holds'))} | {name} |" for name, m in rows]
    else:
        lines.append("No headline metrics in the executed notebooks. A notebook adds a row with "
                     "`adjoint_lib.report.headline(task, metric, value, target, holds)` in an unchecked cell "
                     "(an `application/json` output whose top-level key is `\"report\"`).")
    lines += _bench_markdown(bench)
    for r in runs:
        lines += ["", f"## {r.name}: {r.status}, {r.seconds:.0f} s", ""]
        if r.error:
            lines += [f"Stopped at {r.error}", ""]
        if r.claims:
            lines += ["| cell | printed by this run | against the committed notebook |", "|---|---|---|"]
            for c in r.claims:
                text = c.printed.splitlines()
                first = (text[0] if text else "(no output)") + (f" (+{len(text) - 1} line{'s' if len(text) > 2 else ''})" if len(text) > 1 else "")
                verdict = c.verdict if c.verdict == "holds" else f"**{c.verdict}**"
                lines.append(f"| In [{c.cell}] | `{_td(first, 110).replace('`', chr(39))}` | {verdict} |")
            for c in r.claims:
                if c.verdict == "does not hold":
                    diff = difflib.unified_diff(c.stored.splitlines(), c.printed.splitlines(), "committed",
                                                "this run", n=0, lineterm="")
                    lines += ["", f"In [{c.cell}], committed (-) against this run (+):", "", "```diff",
                              *list(diff)[2:], "```"]
        for k, (cell, png) in enumerate(r.figures, 1):
            lines += ["", f"![{r.name}, figure {k} (In [{cell}])]({figure_src(f'{r.name}_{k}', png)})"]
    return "\n".join(lines) + "\n"


def _bench_markdown(bench: Sequence[dict]) -> list[str]:
    lines = ["", "## Benchmark acceptance checks", ""]
    if not bench:
        return lines + ["No benchmark results with acceptance checks were found."]
    names = list(dict.fromkeys(k for s in bench for k in s["checks"]))
    cols = [f"{s['name']}" + (" (this run)" if s["origin"] == "this run" else "") for s in bench]
    lines += ["| check | criterion | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(bench)]
    for name in names:
        crit = next((s["checks"][name].get("criterion", "") for s in bench if name in s["checks"]), "")
        cells = []
        for s in bench:
            c = s["checks"].get(name)
            cells.append("-" if not isinstance(c, dict) else
                         f"{_fmt(c.get('value'))} {'pass' if c.get('passed') else '**FAIL**'}")
        lines.append(f"| {_td(name)} | {_td(crit)} | " + " | ".join(cells) + " |")
    lines.append("")
    for s, col in zip(bench, cols):
        m = s["meta"]
        lines.append(f"- {col}: `{s['path']}`, {m.get('device_name', '?')}, {str(m.get('date', '?'))[:10]}, "
                     f"commit {m.get('git_commit', '?')}" + (", quick grid" if m.get("quick") else ""))
    lines += ["", "Shipped results are the committed measurements (notebook 07 shows them); "
              "`python -m adjoint_lib.bench` re-measures. Benchmark checks do not change the exit code."]
    return lines


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }}
table {{ border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; vertical-align: top; }}
th {{ background: #f3f3f3; }}
code, pre {{ background: #f6f6f6; font-size: 0.9em; }}
pre {{ padding: 0.6em; overflow-x: auto; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
a.anchor-link {{ display: none; }}
</style></head><body>
{body}
</body></html>
"""


def write_report(runs: Sequence[NotebookRun], out: str | os.PathLike, info: dict,
                 bench: Sequence[dict]) -> tuple[Path, Path]:
    """Write ``<out>/report.md`` (figures in ``<out>/report_files/``) and the self-contained
    ``<out>/report.html`` (figures as data URIs), each atomically."""
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    out = Path(out)
    files: dict[str, bytes] = {}

    def to_file(stem: str, png: bytes) -> str:
        files[f"{stem}.png"] = png
        return f"report_files/{stem}.png"

    md = render_markdown(runs, info, bench, to_file)
    with atomic_dir(out / "report_files") as folder:
        for name, png in files.items():
            (folder / name).write_bytes(png)
    inline = render_markdown(runs, info, bench,
                             lambda stem, png: "data:image/png;base64," + base64.b64encode(png).decode())
    page = _PAGE.format(title=html.escape(f"Reproduction report {info.get('date', '')}"),
                        body=markdown2html_mistune(inline))
    return write_text(out / "report.md", md), write_text(out / "report.html", page)
