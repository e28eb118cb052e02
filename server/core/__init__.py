"""The engine core: engine, prompt bank, residency and fair scheduler, and how the API reaches it."""
