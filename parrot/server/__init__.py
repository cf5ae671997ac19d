"""HTTP servers (FastAPI + uvicorn) for the manager and the engine."""
