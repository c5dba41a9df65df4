"""A standalone Raft library: ``core`` (the pure state machine), ``sim`` (the deterministic
simulator that checks it), and the runtime pieces built on them. Imports nothing from meshgpu."""
