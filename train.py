"""Shim so that `python -m train --gin_configs=... --gin_bindings=...` works from the repository root."""

from mipnerf360.cli.train import run

if __name__ == '__main__':
    run()
