"""A directory of checkpoints: the state file, its members, retention, recovery and fallback.

May import: ``_format/``, ``_storage/base`` and the leaves.
"""
