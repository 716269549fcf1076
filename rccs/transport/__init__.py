"""I/O layers: the picows WebSocket listener and the HTTP side (health, metrics)."""
