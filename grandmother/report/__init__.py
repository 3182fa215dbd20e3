"""Showing results: the results schema, every figure, the HTML report."""
