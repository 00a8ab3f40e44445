"""fastDeploy: serve any Python predictor over HTTP with automatic batching."""

__version__ = "4.0.0"
