"""The save path, read top-down in the order it runs: capture, plan, write, commit.

One process or every rank, now or in the background. May import: ``_history/``, ``_dist/``,
``_format/``, ``_storage/base``, ``_tensorio`` and the leaves; never ``_load/`` or a face.
"""
