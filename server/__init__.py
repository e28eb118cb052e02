"""vpt-serve: a multi-tenant inference server for Visual Prompt Tuning."""

__version__ = "0.1.0"
