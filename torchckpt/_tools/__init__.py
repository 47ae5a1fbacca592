"""What the command line runs besides inspection: verify, export and consolidate.

May import: the engines below and the public API of ``reader``. A tool reads a checkpoint through
``reader`` and is handed the ``Storage`` it writes into by the command line; it never resolves one
from a path.
"""
