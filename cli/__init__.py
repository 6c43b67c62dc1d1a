"""The `addclass` command: the parser (flags generated from flows.settings) and one handler per sub-command."""
