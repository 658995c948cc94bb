"""`python -m mipnerf360.view --gin_configs=... --gin_bindings=...`: see mipnerf360/cli/view.py."""

from mipnerf360.cli.view import run

if __name__ == '__main__':
    run()
