"""The InternLM-XComposer2-VL replica: configuration, modeling, scales, tokenizer and checkpoints."""
