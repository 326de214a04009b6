"""``python -m jobs.cli``: the same as ``jobsctl`` (kept for scripts that call it so)."""

from . import main

main(prog_name="jobsctl")
