"""The latent browser: the collector that keeps each latent's top activations, its records and its static pages."""
