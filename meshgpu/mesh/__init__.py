"""The mesh: how agents find each other, get admitted and agree on who is alive.

``join`` is a new host's side of admission, ``membership`` the leader's voter/learner manager, and
``gossip`` the SWIM + Lifeguard failure detector and metadata dissemination (a pure core and its
simulator). Import from the submodules.
"""
