"""The training pipeline: train or load a classifier, attack it, fit the detector, report."""
