"""CMAL: Cross-Modal Associative Learning for vision-language pre-training."""
