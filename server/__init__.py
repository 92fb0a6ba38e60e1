"""hotpeft.server: HTTP app, engine, base model, CLI."""
