"""Ranks and processes: the coordinator of collective calls, DTensor geometry, preemption signals.

May import: ``_format/`` and the leaves.
"""
