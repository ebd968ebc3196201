"""Data: the loader that feeds every tensor-parallel group the same rows, and datasets."""
