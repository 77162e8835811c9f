"""Templates of the Triton model repository: <model>/config.pbtxt.template and <model>/1/model.py adapters."""
