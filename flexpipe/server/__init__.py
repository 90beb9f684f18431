"""OpenAI-compatible HTTP front end (completions, chat, streaming, /metrics, /health, the chat page)."""

from .app import create_app
from .runner import ServerThread

__all__ = ["create_app", "ServerThread"]
