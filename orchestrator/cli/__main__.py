"""``python -m orchestrator.cli``: the `kt` command."""
from orchestrator.cli import app

app()
