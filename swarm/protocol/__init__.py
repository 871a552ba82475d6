"""What crosses the client edge: frames, requests and replies, the ops, the error codes.

Imports nothing else of swarmcache but :mod:`swarm.errors`, so clients and nodes share it.
"""
