"""minideep: train small language models, dense or Mixture-of-Experts, on the hardware you own."""

__version__ = "0.1.0"
