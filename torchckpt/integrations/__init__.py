"""Glue for the training frameworks users already have: one module per framework.

Each module here imports its framework itself, and only it (``torchckpt.integrations.lightning``
imports ``lightning``): importing ``torchckpt`` imports none of them, and a framework is an
optional extra (``pip install "torchckpt[lightning]"``). The modules are faces over the public
functions (``save_state``, ``load_state``): they translate the framework's calls and habits into
torchckpt's, and add nothing to the format. Nothing in the package imports them.
"""
