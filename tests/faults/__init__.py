"""Fault tests: mediad, its database and its cloud as processes we kill, stop and starve.

A package, so that its conftest imports as `faults.conftest` next to the top-level `conftest`.
"""
