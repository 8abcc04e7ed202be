"""Ray-free steps: plain functions of typed configs and image sets (adapt, teacher outputs, distill, ...).
Imports: data, models and the foundation; no Ray, no MLflow."""
