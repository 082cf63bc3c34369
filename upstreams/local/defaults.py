"""Defaults shared by the local upstream's command line and its engine."""

DEFAULT_CTX = 4096
