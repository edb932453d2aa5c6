from biomedgpt.train.cli import run

run()
