"""A volume or a raw scan prepared, cut into slabs of slices, reconstructed, and written out."""
