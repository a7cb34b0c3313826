"""What the device runs, reported into a named shadow."""
