"""Calibration: capture routing and expert-output statistics of a MoE teacher to Parquet (layout in `store`)."""
