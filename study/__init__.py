"""study: the Ray glue and commands (run, final, export, predict). Wiring only: the science is in
``brainage_core``."""
