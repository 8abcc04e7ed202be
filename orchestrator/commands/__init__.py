"""The user's verbs, one module per verb: run, compare, rank_sources, predict, deploy (export, register), report.
Imports: methods, sweeps and everything below them (never cli/ or demo/)."""
