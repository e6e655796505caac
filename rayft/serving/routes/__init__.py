"""The OpenAI routes, one module per resource; each defines a FastAPI `router`."""
