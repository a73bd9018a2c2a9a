"""``tool_qa``: questions that need the python and search tools (TAPO / RL-Factory style tool-use RL)."""
