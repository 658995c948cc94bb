"""Shim so that `python -m eval --gin_configs=... --gin_bindings=...` works from the repository root."""

from mipnerf360.cli.eval import run

if __name__ == '__main__':
    run()
