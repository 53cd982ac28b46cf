"""`python -m resnet_cluster` runs the CLI."""

from resnet_cluster.cli import main

main()
