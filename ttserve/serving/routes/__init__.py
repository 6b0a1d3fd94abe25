"""The API's endpoints, one router per file: chat, completions, models, and operations (health, metrics)."""
