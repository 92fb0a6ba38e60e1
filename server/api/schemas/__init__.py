"""Request and response bodies, one module per API: `openai` (completions, models, the error
shape), `adapters` (the admin API) and `fine_tuning` (files and jobs)."""
