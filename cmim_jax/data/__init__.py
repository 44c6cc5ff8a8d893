"""Data sources, splits, augmentation and iterators (re-exported by input_pipeline)."""
