"""What users call: the offline `LLM` (llm.py) and the `jpaged` command (cli.py)."""
