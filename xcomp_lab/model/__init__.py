"""The InternLM-XComposer2-VL replica: configuration, modeling, scales, tokenizer, checkpoints, loading (with the
bitsandbytes CPU path chosen on purpose) and the parameter inventory counted on the meta device."""
