"""Thin wrapper: same as the console script (see README); runs biomedgpt.cli.evaluate.main."""

from biomedgpt.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
