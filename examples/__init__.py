"""Runnable examples of the saga engine; each has its own package and README section."""
