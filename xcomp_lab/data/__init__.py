"""Data the course captions and scores: synthetic scenes with their true captions (samples/ ships six), quality metrics."""
