"""The ``jobsctl`` command (also installed as ``jobs``). Thin: parse, call the manager, print
JSON on stdout (or a table on a terminal) and messages on stderr, map errors to the
contract's exit codes. One module per family of commands; this one only gathers them."""

from . import admin, batches, reading, submitting
from .base import main

__all__ = ["admin", "batches", "main", "reading", "submitting"]
