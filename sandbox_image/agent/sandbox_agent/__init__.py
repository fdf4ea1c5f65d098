"""The in-container agent of sandbox-runner (standard library only).

It runs inside every task container under tini, receives one task on stdin, runs
it in a forked child and writes one result envelope to stdout. It never imports
the ``runner`` package: the analyzer core is copied in at image build time as
``sandbox_agent/analyzer_core.py``.
"""
