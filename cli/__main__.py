"""`python -m ghindex_cli ...` (what torchrun launches)."""
from .main import cli

if __name__ == "__main__":
    cli(prog_name="ghindex")
