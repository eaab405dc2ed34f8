"""``python -m perturb_lens.cli.app``: the command line."""

from perturb_lens.cli.app import app

app()
