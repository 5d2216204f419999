"""Stage drivers; filled in by the data-pipeline, training and inference stages."""
