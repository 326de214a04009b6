"""Helpers shared by the service tests (poller, serve, crash, replicas): waiting, free ports,
``jobs serve`` as a subprocess, and an emulator that records when each request was polled."""
