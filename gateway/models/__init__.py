"""The Chatterbox model families this server can load, and what each one accepts."""
