"""Stability benchmark: small tasks whose gradients explode or spike (see README.md)."""
