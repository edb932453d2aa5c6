"""Thin wrapper: same as the console script (see README); runs biomedgpt.cli.generate.main."""

from biomedgpt.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
