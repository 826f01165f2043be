"""The only package of `pipeline` that imports Ray: it joins or starts a cluster, runs model
replicas and the shard driver on it, scores evaluations and trains with Ray Train. Each module
wraps plain `pipeline` objects; the rules they apply (sizing, run identity, the shard commit)
live outside, in modules that never import Ray.
"""
