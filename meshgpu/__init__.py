"""meshgpu."""

# The agent's version: a host that runs another one is refused at join (``meshgpu/ops/admission``),
# so a mesh never mixes builds that may disagree on the replicated state. Kept equal to
# pyproject.toml's ``version`` (tests/host/test_pyz.py checks it).
__version__ = "0.1.0"
