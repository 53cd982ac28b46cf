"""resnet-cluster: reproduce "Deep Residual Learning for Image Recognition" on Ray clusters."""

__version__ = "0.1.0"
