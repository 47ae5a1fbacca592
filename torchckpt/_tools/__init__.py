"""What the command line runs besides inspection: export and consolidation.

May import: the engines below and the public API of ``reader``.
"""
