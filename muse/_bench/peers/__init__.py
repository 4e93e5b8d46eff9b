"""Sources and templates for the bench's peer servers (package data).

Nothing here is imported by MUSE: ``fastapi_app.py`` runs inside the FastAPI
peer's own virtual environment, and ``mlserver/`` holds the settings files
MLServer reads.
"""
