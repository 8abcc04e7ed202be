"""Hyper-parameter sweeps (Ray Tune + Optuna): search spaces, driver, trial, Pareto fronts, CSV, plots.
Imports: methods, stages, models, ray_adapters, run_context, tracking and the foundation."""
