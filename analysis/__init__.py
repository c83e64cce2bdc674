"""analysis: read study folders into tidy tables, build the leaderboard, Pareto front, importances,
figures and the self-contained HTML report (``python analysis/report.py STUDY_DIR --out report.html``)."""
