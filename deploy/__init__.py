"""Data only: the roster of specialists and the nats-server configs (read with importlib.resources)."""
