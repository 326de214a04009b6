"""``python -m jobs``: the same as the ``jobsctl`` command."""

from .cli import main

main(prog_name="jobsctl")
