"""Finding and measuring units: the probe, the held-out protocol, pictures, invariance, classifiers."""
