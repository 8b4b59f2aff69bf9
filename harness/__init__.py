"""Benchmark and ablation harness for long-context fine-tuning of hybrid SSM/attention LMs."""

__version__ = "0.1.0"
