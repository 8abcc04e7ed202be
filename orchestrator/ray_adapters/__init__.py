"""The only package that imports ray: Data (inference, ingest, embedding), Train, Tune, Jobs, session set-up.
Imports: stages, data, models, tracking and the foundation; never the layers above (calls down, never up)."""
