"""SSH fleets: the agent as one self-contained file (``pyz``), carried to bare hosts over SSH
(``ssh``) by the leader's fleet controller (``meshgpu/control/fleets.py``)."""
