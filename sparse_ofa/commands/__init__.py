"""Subcommands of the `sparse-ofa` CLI, one module each (see sparse_ofa/cli.py)."""
