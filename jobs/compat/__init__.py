"""Drop-in modules for code written against other clients: :mod:`jobs.compat.fal`."""
