"""aish: the shell for talking to Tekton's specialists over NATS."""
