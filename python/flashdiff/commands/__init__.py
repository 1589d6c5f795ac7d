"""Sub-command handlers of the `flashdiff` CLI (one module per group; cli.py registers them)."""
