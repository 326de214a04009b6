"""``python -m jobs``: the same as the ``jobs`` command."""

from .cli import main

main()
