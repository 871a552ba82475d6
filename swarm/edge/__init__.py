"""What clients meet: the client WebSocket protocol and the node's HTTP pages."""
