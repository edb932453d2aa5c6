"""Thin wrapper: same as the console script (see README); runs biomedgpt.cli.sample_data.main."""

from biomedgpt.cli.sample_data import main

if __name__ == "__main__":
    raise SystemExit(main())
