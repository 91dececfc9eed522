"""Checkpoint-conversion configs (configs/convert/common.py)."""
