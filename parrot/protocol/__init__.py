"""Pydantic models of every HTTP payload: the only place JSON shapes live."""
