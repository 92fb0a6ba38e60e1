"""hotpeft.server: the HTTP server. app.py builds it; runtime.py holds what it serves (model,
catalogue, engine, jobs, metrics); api/ the routes and their bodies; engine/ the batching engine;
ray/ the Ray Serve deployment; tools/ what a user runs against a server (bench, loadtest)."""
