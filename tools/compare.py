"""Thin wrapper: same as the console script (see README); runs biomedgpt.cli.compare.main."""

from biomedgpt.cli.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
