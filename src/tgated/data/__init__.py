"""Datasets, slices, phantoms and example scans."""
