from raee_ops.cli import entry

entry()
