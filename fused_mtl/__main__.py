"""``python -m fused_mtl``: the ``fused-mtl`` command."""

from fused_mtl.app.cli import run

if __name__ == "__main__":
    run()
