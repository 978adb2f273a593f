"""What the decoder gives beyond the latent space: differential expression and imputation."""
