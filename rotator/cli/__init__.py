"""The `kimi-rotator` command line: its verbs (`rotator.cli.main`), their arguments, help
and output; `python -m rotator.cli` runs it."""
