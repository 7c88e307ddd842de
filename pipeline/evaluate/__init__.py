"""Downstream evaluation: datasets, features, probes, metrics, fine-tuning."""
