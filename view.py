"""Shim so that `python -m view --gin_configs=... --gin_bindings=...` works from the repository root."""

from mipnerf360.cli.view import run

if __name__ == '__main__':
    run()
