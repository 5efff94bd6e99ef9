"""chatterbox-gateway: an OpenAI-compatible speech server for Chatterbox."""

__version__ = "0.1.0"
