"""``python -m meshgpu`` runs the CLI."""

from meshgpu.cli import main

main()
