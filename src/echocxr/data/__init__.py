"""Data: corpus readers, cleaning and normalization, phantom radiographs, datasets."""
