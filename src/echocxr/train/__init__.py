"""Training: the loop shared by all stages and one module per stage (ar, rad, dcd)."""
