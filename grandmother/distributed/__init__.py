"""Training over many processes: Downpour SGD on Ray and spatial model parallelism."""
