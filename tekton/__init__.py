"""The `tekton` command: starts and supervises the pieces (nats-server, specialists) and reports status."""
