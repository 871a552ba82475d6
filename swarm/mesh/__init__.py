"""The peer links between nodes: handshake, membership, forwarding and dialling."""
