"""OpenAI-compatible HTTP gateway in front of one or more Triton replicas: API keys (tenant from the key), rate
limits, routing by load, Prometheus metrics. Wire format in openai_api.py, keys and limits in auth.py, replicas in
replicas.py, the Triton side in upstream.py, routes in app.py, the uvicorn runner in server.py."""
