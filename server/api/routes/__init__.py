"""One router per resource: openai (completions, models), adapters, files, jobs, ops."""
