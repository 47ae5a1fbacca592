"""Bytes on disk: on-disk names, dtypes, safetensors headers, the index and the typed JSON tree.

Everything here is built and parsed from bytes and does no I/O, so one parser serves a local
file, a ranged GET and a test. May import: the leaves (``errors``, ``_paths``, ``_version``) only.
"""
