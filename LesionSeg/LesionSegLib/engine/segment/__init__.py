"""Segmentation: networks, sliding-window inference, clusters, per-cluster features and confidence."""
