"""Pydantic models of every HTTP payload: the only place JSON shapes live."""


def error_message(response) -> str:
    """The message of an error response ({"error": {"message": ...}}), or its text."""
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or response.reason_phrase
