"""Device Defender device-side metrics."""
