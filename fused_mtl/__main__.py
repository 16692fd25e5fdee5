"""``python -m fused_mtl``: the ``fused-mtl`` command."""

from fused_mtl.cli import run

if __name__ == "__main__":
    run()
