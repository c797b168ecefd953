"""The InternLM-XComposer2-VL replica: configuration, modeling, scales, tokenizer, checkpoints (with their shard
manifest and a lock for concurrent builders), loading (with the bitsandbytes CPU path chosen on purpose), the
parameter inventory counted on the meta device, and checkpoints that run the original model's own remote code."""
