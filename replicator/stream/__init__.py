"""stream: replication proper, from a master's sources to its replicas' repositories.

(The full docstring comes with the move of the stream modules.)
"""
