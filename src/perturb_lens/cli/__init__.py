"""The ``perturb-lens`` command line: thin Typer commands (:mod:`.app`, :mod:`.sae`,
:mod:`.replication`) that parse, call one workflow or analysis function, and print."""

from perturb_lens.cli.app import app

__all__ = ["app"]
