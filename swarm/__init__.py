"""swarmcache: a key=>value cache run as a swarm of nodes linked over WebSockets."""

__version__ = "0.1.0"
