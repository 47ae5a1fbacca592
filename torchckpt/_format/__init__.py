"""Bytes on disk: names and limits (``spec``), dtypes, safetensors headers, the JSON documents, the
index, the typed JSON tree, and formats 2 and 3 (``chunks``, ``blocks``).

Everything here is built and parsed from bytes and does no I/O, so one parser serves a local
file, a ranged GET and a test. May import: the leaves (``errors``, ``_paths``, ``_version``,
``_threads``, ``_clock``) only.
"""
