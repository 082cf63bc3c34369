"""Nudging's decoding logic: upstream calls, prompt templates, the algorithm, stopping.

Framework-free: nothing here imports a web framework.
"""
