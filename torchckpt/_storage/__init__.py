"""Where bytes live: the ``Storage`` protocol and its backends (the local filesystem, fsspec URLs).

The only floor that calls the operating system's file APIs, ``fcntl`` or fsspec. Each backend
is a file of its own; ``registry`` is the one place that builds one from a path, and only the
public faces call it. May import: ``_format/`` and the leaves.
"""
