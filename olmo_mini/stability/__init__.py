"""Training-stability observatory: metric math, the monitor callback and run readers."""
