"""Running the model: the one greedy `generate` call and end-of-turn rule, batched captions, the measured call, speed."""
