"""Helpers that belong to one notebook each, named after its lesson (02 precision ... 08 planner)."""
