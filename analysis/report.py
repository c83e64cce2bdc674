"""``python analysis/report.py STUDY_DIR [STUDY_DIR ...] --out report.html``: the study report.

Executes the jupytext notebook ``analysis/study_report.py`` headlessly (nbclient, one fresh kernel)
with the study folders injected after its ``parameters`` cell, and writes one self-contained HTML file
(figures embedded as base64 PNG, no external scripts) with the leaderboard, the Pareto front, Optuna
importances, metrics against epoch, seed intervals and the published reference figures.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbconvert import HTMLExporter

from analysis.loader import best_rows, check_metric, load_studies
from brainage_core.errors import BrainageError, DataError

NOTEBOOK = Path(__file__).with_name("study_report.py")
REPO_ROOT = Path(__file__).resolve().parent.parent
PARAMETERS_TAG = "parameters"


def inject_parameters(nb: nbformat.NotebookNode, params: dict) -> nbformat.NotebookNode:
    """Insert a code cell assigning ``params`` right after the cell tagged ``parameters`` (papermill's
    convention); the injected cell is tagged ``injected-parameters``. ``ValueError`` if no such cell."""
    index = next(
        (i for i, c in enumerate(nb.cells) if PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])), None
    )
    if index is None:
        raise ValueError(f"{NOTEBOOK} has no cell tagged {PARAMETERS_TAG!r}")
    source = "# Injected by analysis/report.py\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def _strip_external_scripts(html: str) -> str:
    """Remove ``<script src="http…">`` tags (MathJax, require.js CDNs): the report must open offline."""
    return re.sub(r'<script[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>', "", html)


def build_report(
    study_dirs: list[str | Path],
    out: str | Path,
    *,
    metric: str = "val_lc",
    top: int = 30,
    show_code: bool = False,
    notebook_out: str | Path | None = None,
    timeout: int = 600,
) -> Path:
    """Execute the report notebook on ``study_dirs`` and write the HTML to ``out``; returns its path.

    ``study_dirs`` may hold URIs (``s3://bucket/studies/NAME``). Raises ``DataError``/``ConfigError`` before
    starting a kernel when a folder is unreadable, the metric
    unknown, or no study has a finished trial; ``CellExecutionError`` if a notebook cell fails.
    """
    from study.storage import StudyFolder, is_uri

    # a study on an object store is read through its local mirror (small files downloaded)
    dirs = [str(StudyFolder(d).materialize()) if is_uri(d) else str(Path(d).expanduser().resolve())
            for d in study_dirs]
    results = load_studies(dirs)
    check_metric(results, metric)
    if best_rows(results, metric).empty:
        raise DataError(
            f"no finished trial with a {metric} value in {', '.join(dirs)}; expected at least one trial "
            "that reported an evaluation (status TERMINATED/COMPLETE)"
        )
    nb = jupytext.read(NOTEBOOK)
    inject_parameters(nb, {"study_dirs": dirs, "metric": metric, "top": top})
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}}
    )
    client.execute()
    if notebook_out is not None:
        nbformat.write(nb, str(notebook_out))
    exporter = HTMLExporter(template_name="lab", exclude_input=not show_code, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    html, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": "Study report"}})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_strip_external_scripts(html), encoding="utf-8")
    return out.resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python analysis/report.py", description=__doc__.splitlines()[0],
        allow_abbrev=False)
    parser.add_argument("study_dirs", nargs="+", metavar="STUDY_DIR", help="study folder(s) written by study/run.py")
    parser.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    parser.add_argument("--metric", default="val_lc", help="validation metric that ranks trials (default: val_lc)")
    parser.add_argument("--top", type=int, default=30, help="leaderboard rows (default: 30)")
    parser.add_argument("--show-code", action="store_true", help="keep the notebook's code cells in the HTML")
    parser.add_argument("--notebook", default=None, help="also write the executed notebook (.ipynb) here")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per notebook cell (default: 600)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.study_dirs, args.out, metric=args.metric, top=args.top, show_code=args.show_code,
                            notebook_out=args.notebook, timeout=args.timeout)
    except BrainageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CellExecutionError as exc:
        print(f"error: the report notebook failed:\n{exc}", file=sys.stderr)
        return 1
    print(f"report written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
