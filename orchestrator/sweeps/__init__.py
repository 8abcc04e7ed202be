"""Hyper-parameter sweeps (Ray Tune + Optuna) and their results: Pareto fronts, CSV, plots."""
