"""hotpeft.server.engine: the batching engine, one room per concern.

    interface.py  the boundary the HTTP layer sees: requests, events, stats, residency, errors
    scheduler.py  BatchEngine: the worker thread, the queue, admission, the step loop
    residency.py  the device tier: which LoRA versions the stacks hold, LRU within a byte budget
    runner.py     one step: pack the rows, run the forward pass, sample, make events
    forward.py    the decoder's forward pass over a packed batch (Llama, Mistral, Qwen2)
    kv.py         the KV cache slots and their budget
    lora.py       the LoRA stacks of every projection group; lora_plan.py: how a step uses them
    sampling.py, detok.py   per-row sampling; incremental detokenization with stop strings
"""
