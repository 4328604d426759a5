"""Helpers shared by the tests (no fixtures: those live in tests/conftest.py). Imported as ``helpers.<module>``:
pytest puts tests/ on sys.path because tests/conftest.py sits in a folder without __init__.py."""
