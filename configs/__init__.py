"""Experiment configs: one ml_collections file per row of the paper's tables (+ tiny CPU twins)."""
