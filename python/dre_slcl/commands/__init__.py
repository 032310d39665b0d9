"""Subcommands of ``dre-slcl``, one module each."""
