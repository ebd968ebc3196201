"""Example models: plain single-device Flax NNX code, sharded from outside by a plan."""

from jtp.models.feedforward import FeedForward

__all__ = ["FeedForward"]
