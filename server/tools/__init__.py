"""hotpeft.server.tools: what a user runs against a server. `bench` (with `workload`, `bench_naive`),
`bench_ray`, `loadtest`, `localserver` (start one on 127.0.0.1 and wait for it), `precision`
(quality and speed of each resident precision)."""
