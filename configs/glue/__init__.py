"""GLUE fine-tuning configs: one file per task, all built by common.glue(task, ...)."""
