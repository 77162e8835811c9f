"""Logic of the Triton Python models; each model.py in model_repository/ is a thin adapter over these modules."""
