"""aish: the shell for talking to Tekton's specialists over NATS.

Importing the package loads nothing: the one-shot path (aish_client/oneshot.py) must start in a blink.
"""
