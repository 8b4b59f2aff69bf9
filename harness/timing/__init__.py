"""Timing that a regression gate can trust: base and head timed alternately in one job (interleave), and the
statistics that judge the samples (stats)."""
