"""`python -m rotator.cli`: the CLI, as `kimi-rotator` runs it."""

from rotator.cli.main import main

raise SystemExit(main())
