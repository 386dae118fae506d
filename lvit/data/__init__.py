"""Data: reading records, loading images, building the training dataset and batches."""
