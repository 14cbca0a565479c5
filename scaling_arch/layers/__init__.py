"""Shared building blocks of every architecture: dense, norms, embeddings, attention, position bias,
feed-forward, and the encoder-decoder skeleton that composes them from gin-bound factories."""
