"""rayft: fine-tune large language models on a Ray cluster and serve the results."""

__version__ = "0.1.0"
