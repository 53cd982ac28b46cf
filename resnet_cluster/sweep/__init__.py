"""Ray Tune sweeps that reproduce the seed experiments' tables (``resnet-cluster sweep``)."""
