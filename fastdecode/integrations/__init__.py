"""Adapters that plug fastdecode into other serving engines."""
