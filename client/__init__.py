"""Client API over tritonclient (HTTP and gRPC, streaming) and load generation."""
