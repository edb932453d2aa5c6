"""Thin wrapper: same as the console script (see README); runs biomedgpt.cli.import_checkpoint.main."""

from biomedgpt.cli.import_checkpoint import main

if __name__ == "__main__":
    raise SystemExit(main())
