"""Only what pyproject.toml cannot say: the package list joins the found ``jobs*`` packages
with the Alembic revisions, which stay at the repository root for developers and the
``alembic`` command, and ship inside the wheel as ``jobs/migrations``, where
:func:`jobs.migrate.migrations_dir` looks first."""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["jobs", "jobs.*"]),
        "jobs.migrations",
        "jobs.migrations.versions",
    ],
    package_dir={
        "jobs.migrations": "migrations",
        "jobs.migrations.versions": "migrations/versions",
    },
    package_data={"jobs.migrations": ["script.py.mako"]},
)
