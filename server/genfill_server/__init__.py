"""genfill server: websocket app, job queue, engines and model registry."""
