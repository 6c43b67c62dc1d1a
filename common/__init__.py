"""What every layer of addclass shares and nothing else: the project's error types (`common.errors`)."""
