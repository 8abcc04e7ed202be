"""The only package that imports ray: Data (actor-pool inference), Train (distillation), session set-up."""
