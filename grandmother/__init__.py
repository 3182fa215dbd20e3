"""grandmother: learn class-specific "grandmother neurons" from unlabeled images (Le et al., ICML 2012)."""
__version__ = "0.1.0"
