"""Shim so that `python -m render --gin_configs=... --gin_bindings=...` works from the repository root."""

from mipnerf360.cli.render import run

if __name__ == '__main__':
    run()
