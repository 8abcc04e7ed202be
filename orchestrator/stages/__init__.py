"""Pipeline stages: plain functions of typed configs and arrays, no Ray and no MLflow imports."""
