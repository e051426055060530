"""Experiment configs (ml-collections). Each file defines get_config()."""
