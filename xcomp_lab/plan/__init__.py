"""Plan any transformers LLM or VLM: predict the memory of a generate call from its config, with no weights and no GPU."""
