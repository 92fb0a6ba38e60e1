"""hotpeft.server.ray: the Ray Serve deployment (`pip install hotpeft[ray]`; imports ray).

    deploy.py   the application: ingress + N engine replicas, `hotpeft serve --ray`
    replica.py  EngineReplica: one model and engine per replica
    engine.py   RayEngine: the ingress's `Engine`, backed by the replicas
    board.py    the board actor: every replica's state to the ingress, commands back
    settings.py names and settings every process of the application shares
"""
