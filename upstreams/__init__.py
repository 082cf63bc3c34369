"""Upstream servers shipped with the product (simulated and local models)."""
