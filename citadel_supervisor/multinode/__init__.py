"""Multinode services: one deployment across nodes, a rank on each, supervised as one group.

``rank`` says who a worker is in its group; ``auth`` signs and checks what the
citadelds of a group tell each other; ``checks`` validates the config across
nodes; ``coordinator`` runs the gang: the head (rank 0) numbers generations and
restarts the whole group when any rank fails; the others follow it. docs/multinode.md.
"""
