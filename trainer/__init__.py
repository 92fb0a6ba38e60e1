"""hotpeft.trainer: JSONL in, an evaluated and registered adapter out. pipeline.py runs the steps
(data.py, train.py, evaluate.py, then the catalogue); env.py says which base and where to register;
jobs/ runs fine-tuning jobs for the server in worker processes."""
