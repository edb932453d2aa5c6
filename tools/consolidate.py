"""Thin wrapper: same as the console script (see README); runs biomedgpt.cli.consolidate.main."""

from biomedgpt.cli.consolidate import main

if __name__ == "__main__":
    raise SystemExit(main())
