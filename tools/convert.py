"""Thin wrapper: same as the console script (see README); runs biomedgpt.cli.convert.main."""

from biomedgpt.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
