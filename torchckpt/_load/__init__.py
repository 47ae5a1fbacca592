"""The load path: match tracked objects to saved values, then read the planned bytes into them.

May import: ``_history/``, ``_dist/``, ``_format/``, ``_storage/base``, ``_tensorio`` and the
leaves; never ``_save/`` or a face.
"""
